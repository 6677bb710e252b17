"""probes: linear probes on frozen activations (all layers in one batched fit) and SAE-latent probes."""

from __future__ import annotations

from interp.lazy import lazy_exports

# public name -> module that defines it (lazy, so `import probes` stays cheap)
_EXPORTS: dict[str, str] = {
    # tasks
    "ProbeTask": "probes.tasks",
    "load_task": "probes.tasks",
    "list_tasks": "probes.tasks",
    # activations
    "collect_activations": "probes.collect",
    "resid_post_hooks": "probes.collect",
    # fitting
    "LinearFit": "probes.fit",
    "fit_logistic": "probes.fit",
    "fit_mass_mean": "probes.fit",
    "l2_from_sklearn_c": "probes.fit",
    "sklearn_c_from_l2": "probes.fit",
    # metrics and hygiene
    "accuracy": "probes.metrics",
    "balanced_accuracy": "probes.metrics",
    "f1_score": "probes.metrics",
    "auroc": "probes.metrics",
    "Split": "probes.metrics",
    "group_split": "probes.metrics",
    "control_labels": "probes.metrics",
    "shuffled_labels": "probes.metrics",
    # sweeps, artefacts, plots
    "ProbeConfig": "probes.sweep",
    "ProbeReport": "probes.sweep",
    "run_probe": "probes.sweep",
    "LinearProbe": "probes.artefacts",
    "save_probe": "probes.artefacts",
    "load_probe": "probes.artefacts",
    "plot_layer_curve": "probes.plot",
    # probes on SAE latents
    "SparseProbe": "probes.sparse",
    "encode_latents": "probes.sparse",
    "rank_latents": "probes.sparse",
    "fit_sparse_probes": "probes.sparse",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
