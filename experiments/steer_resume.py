"""Resuming ``interp steer`` sweeps: the output JSON is rewritten after every strength.

A rerun with the same ``--out`` reuses the unsteered continuations and every strength already
done when its run key matches: same model, device, dtype, intervention, positions, generation
settings, prompts and the same steering weights (a digest of the SAE's or vector's tensors).
Reused results are re-scored from their texts, so a changed ``--keywords`` costs no generation.
Any other file at ``--out`` is replaced, as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from interp.files import atomic_write_json

__all__ = ["run_key", "previous_run", "rescore", "save_run"]


def _tensors(source: Any) -> list[torch.Tensor]:
    """The tensors that decide what steering with ``source`` does (weights, max activations or the vector)."""
    if isinstance(source, torch.nn.Module):
        extra = getattr(source, "max_activations", None)
        return [*source.state_dict().values(), *([extra] if isinstance(extra, torch.Tensor) else [])]
    return [source.vector]


def run_key(header: dict[str, Any], samples: list[str], source: Any) -> str:
    """A digest of everything that decides a sweep's continuations except the strengths."""
    digest = hashlib.sha256(json.dumps({"header": header, "samples": samples}, sort_keys=True, default=str).encode())
    for t in _tensors(source):
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def previous_run(out: Path | None, key: str, strengths: list[str]) -> tuple[dict[str, Any] | None, dict[str, dict]]:
    """``(base, {strength: result})`` from an earlier run at ``out`` with this key, else ``(None, {})``."""
    if out is None or not Path(out).is_file():
        return None, {}
    try:
        data = json.loads(Path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None, {}
    if not isinstance(data, dict) or data.get("run_key") != key or not isinstance(data.get("base"), dict):
        return None, {}
    results = data.get("results")
    rows = [r for r in results if isinstance(r, dict) and r.get("strength") in strengths] if isinstance(results, list) else []
    if not isinstance(data["base"].get("texts"), list) or not all(isinstance(r.get("samples"), list) for r in rows):
        return None, {}
    return data["base"], {r["strength"]: r for r in rows}


def rescore(result: dict[str, Any], words: list[str] | None) -> dict[str, Any]:
    """``result`` with its hit rates computed from its texts (steered, base and, when present, random)."""
    from interp.steering_eval import concept_hit_rate

    samples = result["samples"]
    result = dict(result)
    for field, text in (("hit_rate", "steered"), ("base_hit_rate", "base"), ("random_hit_rate", "random")):
        if text != "random" or (samples and "random" in samples[0]):
            result[field] = concept_hit_rate([s.get(text, "") for s in samples], words) if words else None
    return result


def save_run(out: Path, header: dict[str, Any], key: str, base: dict[str, Any], results: list[dict], complete: bool) -> None:
    """Write the sweep so far atomically (``complete`` is False while strengths remain)."""
    atomic_write_json(out, {**header, "run_key": key, "complete": complete, "base": base, "results": results})
