"""Hugging Face hub names: recognising them, resolving TransformerLens aliases, booting, and errors.

A hub id is ``org/model`` or a name in TransformerLens's supported-model registry. Loading one
downloads it when online; offline (``HF_HUB_OFFLINE``, or no network) only the local Hugging Face
cache is used, and a miss becomes one line saying so and what to do instead.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from interp.errors import UserError

if TYPE_CHECKING:
    from transformer_lens import TransformerBridge

__all__ = ["boot_hub", "hub_error", "hub_registry", "is_hub_name", "official_hub_name", "remote_code_error"]


def hub_registry() -> list[str]:
    """Hub ids in TransformerLens's supported-model registry, verified ones first (empty if unreadable)."""
    from transformer_lens.tools.model_registry import api

    try:
        verified = [m.model_id for m in api.get_supported_models(verified_only=True)]
        return list(dict.fromkeys(verified + [m.model_id for m in api.get_supported_models()]))
    except Exception:  # the registry is optional data: a broken one must not hide the real error
        return []


def is_hub_name(name: str) -> bool:
    """An ``org/model`` hub id that is not a path, or a TransformerLens-registered id or alias."""
    if name.count("/") == 1 and all(name.split("/")):
        return True
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    return bool(resolve_model_alias(name)) or name in hub_registry()


def official_hub_name(name: str) -> str:
    """The official hub id for a TransformerLens alias (e.g. ``pythia-14m``), else ``name``."""
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    return resolve_model_alias(name) or name


def _hub_offline() -> bool:
    """True when the environment switches the Hugging Face hub off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _unreachable_hub(err: BaseException) -> bool:
    """True when the error chain says the hub could not be reached and nothing was cached."""
    seen: BaseException | None = err
    while seen is not None:
        if type(seen).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "couldn't connect" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def hub_error(name: str, what: str, err: Exception) -> UserError:
    """One-line error for a hub load that failed: offline / unreachable, or the hub's own first line."""
    if _hub_offline() or _unreachable_hub(err):
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the Hugging Face hub cannot be reached"
        return UserError(f"model {name!r} is not available offline: its {what} are not in the local Hugging Face cache and {why}; pass a local model directory, or run once online to download it")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(f"could not fetch the {what} of {name!r} from the Hugging Face hub ({first}); check the name, or pass a local model directory")


def boot_hub(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> TransformerBridge:
    """Boot a hub model by id (downloads when online; the local Hugging Face cache when offline)."""
    from transformer_lens import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise hub_error(name, "weights", err) from err
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise remote_code_error(name) from err
        raise


def remote_code_error(name: str) -> UserError:
    """The error for a model that ships Python code the user has not agreed to run."""
    return UserError(f"{name} needs custom Python code shipped with the model; review it, then pass trust_remote_code=True (--trust-remote-code)")
