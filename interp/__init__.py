"""interp: models, data, activations, steering and the contracts shared by every package.

Imports are lazy so that ``import interp`` is cheap and one module's heavy dependencies load
only when used. ``interp`` never imports ``saes``, ``probes`` or ``experiments``.
"""

from __future__ import annotations

from interp.lazy import lazy_exports

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # shared contracts
    "UserError": "interp.errors",
    "FeatureDictionary": "interp.dictionary",
    "Direction": "interp.directions",
    "save_direction": "interp.directions",
    "load_direction": "interp.directions",
    "atomic_write": "interp.files",
    "atomic_write_json": "interp.files",
    "save_safetensors_atomic": "interp.files",
    # models
    "load_model": "interp.models",
    "format_prompt": "interp.models",
    "list_models": "interp.models",
    "model_name": "interp.models",
    "load_tokenizer": "interp.models",
    # data
    "load_corpus": "interp.corpus",
    "list_corpora": "interp.corpus",
    "pack_windows": "interp.corpus",
    "Corpus": "interp.corpus",
    # activations
    "harvest": "interp.activations",
    "ActivationStore": "interp.store",
    # steering and generation
    "Clamp": "interp.steering",
    "Scale": "interp.steering",
    "Ablate": "interp.steering",
    "Add": "interp.steering",
    "contrastive_vector": "interp.steering",
    "steered": "interp.steering",
    "generate": "interp.generation",
    "Generations": "interp.generation",
    "Positions": "interp.steering_positions",
    "mean_residual_norm": "interp.steering",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
