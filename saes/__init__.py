"""saes: TopK sparse autoencoders: model, sparse kernels, trainer, evaluation and dashboards."""

from __future__ import annotations

from interp.lazy import lazy_exports

# public name -> module that defines it (lazy, so `import saes` stays cheap)
_EXPORTS: dict[str, str] = {
    # model and files (SAE-math engineer)
    "TopKSAE": "saes.model",
    "load": "saes.io",
    "save": "saes.io",
    "from_pretrained": "saes.io",
    # stacked training step (SAE-math engineer)
    "StackParams": "saes.step",
    "StepConfig": "saes.step",
    "StepState": "saes.step",
    "init_stack": "saes.step",
    "init_state": "saes.step",
    "sae_step_loss": "saes.step",
    "constrain_decoder_grad": "saes.step",
    "normalize_decoder": "saes.step",
    # training loop (SAE-loop engineer)
    "TrainConfig": "saes.config",
    "train": "saes.trainer",
    "read_metrics": "saes.training_log",
    # evaluation, feature analysis and dashboards (eval engineer)
    "evaluate": "saes.evaluation",
    "FeatureScan": "saes.features",
    "scan_features": "saes.features",
    "save_feature_stats": "saes.features",
    "top_contexts": "saes.features",
    "logit_lens": "saes.features",
    "neighbours": "saes.features",
    "search_features": "saes.search",
    # steering-feature choice (steering demo helper)
    "select_steering_feature": "saes.steer_select",
    "steering_effect": "saes.steer_select",
    "predictive_search": "saes.steer_select",
    "choose_steering_pair": "saes.steer_select",
    "Dashboard": "saes.dashboard",
    "build_dashboard": "saes.dashboard",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
