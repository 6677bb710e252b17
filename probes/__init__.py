"""probes: linear probes on frozen activations (all layers in one batched fit) and SAE-latent probes."""

from __future__ import annotations

from interp.lazy import lazy_exports

# public name -> module that defines it (lazy, so `import probes` stays cheap)
_EXPORTS: dict[str, str] = {}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
