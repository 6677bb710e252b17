"""SAE directories on disk: ours (= SAELens layout), SAELens's and sparsify's, plus the hub.

Our directory: ``cfg.json`` + ``sae_weights.safetensors`` with SAELens key names and shapes
(``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``; a BatchTopK
SAE also writes ``threshold [d_sae]`` and says ``architecture: "jumprelu"``, which is exactly its
inference rule). An optional ``feature_stats.safetensors`` (key ``max_activations``) fills
``max_activations``. sparsify directories hold ``cfg.json`` + ``sae.safetensors`` with
``encoder.weight [n, d]``, ``encoder.bias``, ``W_dec``, ``b_dec``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.errors import UserError
from interp.files import atomic_write_json, save_safetensors_atomic
from saes.model import TopKSAE

__all__ = ["save", "load", "from_pretrained", "sae_cfg", "SAE_FORMAT_VERSION"]

SAE_FORMAT_VERSION = 1
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
STATS_FILE = "feature_stats.safetensors"


def sae_cfg(sae: TopKSAE) -> dict[str, Any]:
    """``cfg.json`` for ``sae``: SAELens v6 keys, the older v5 keys, and our provenance keys."""
    meta = {"model_name": sae.model, "hook_name": sae.hook_name, "hook_head_index": None, "prepend_bos": True}
    return {
        "architecture": "jumprelu" if sae.batch_topk else "topk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "model_name": sae.model,
        "hook_name": sae.hook_name,
        "activation_fn_str": "topk" if not sae.batch_topk else "relu",
        "activation_fn_kwargs": {"k": sae.k} if not sae.batch_topk else {},
        "metadata": meta,
        "format_version": SAE_FORMAT_VERSION,
        "library": "interp-workbench",
        "batch_topk": sae.batch_topk,
        "threshold": sae.threshold,
        "activation_scale": sae.activation_scale,
        "extra": sae.extra,
    }


def save(sae: TopKSAE, path: str | os.PathLike) -> Path:
    """Write ``sae`` to the directory ``path`` (weights first, then cfg.json; each file atomic)."""
    path = Path(path)
    tensors = {name: getattr(sae, name).detach().float() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise UserError(f"SAE weight {name} contains NaN or Inf; the training diverged, lower the learning rate and retrain")
    if sae.threshold is not None:
        tensors["threshold"] = torch.full((sae.n_latents,), float(sae.threshold))
    save_safetensors_atomic(path / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    if sae.max_activations is not None:
        save_safetensors_atomic(path / STATS_FILE, {"max_activations": sae.max_activations.detach().float()})
    atomic_write_json(path / "cfg.json", sae_cfg(sae))
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}; the SAE directory is corrupt, re-save or re-download it") from err
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object; the SAE directory is corrupt, re-save or re-download it")
    return cfg


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot read {path} ({str(err).splitlines()[0] if str(err) else type(err).__name__}); the file is corrupt or truncated, re-save or re-download it") from err


def _need(tensors: dict[str, Tensor], keys: tuple[str, ...], path: Path) -> None:
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise UserError(f"{path} lacks the weight(s) {', '.join(missing)} (has: {', '.join(sorted(tensors)) or 'none'}); it is not a TopK SAE file")


def _need_int(cfg: dict[str, Any], key: str, path: Path) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{path} has no integer {key!r}; the SAE config is incomplete, re-save or re-download it")
    return value


def _build(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int, path: Path, **kw: Any) -> TopKSAE:
    d_in, n = W_enc.shape if W_enc.ndim == 2 else (-1, -1)
    expected = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    for name, t in zip(expected, (W_enc, b_enc, W_dec, b_dec)):
        if tuple(t.shape) != expected[name] or d_in <= 0:
            raise UserError(f"{path}: weight {name} has shape {tuple(t.shape)}, expected {expected[name]}; the file does not match its cfg.json")
    sae = TopKSAE(d_in, n, k, **kw)
    with torch.no_grad():
        for name, t in zip(expected, (W_enc, b_enc, W_dec, b_dec)):
            getattr(sae, name).copy_(t.float())
    return sae


def _load_saelens(path: Path, cfg: dict[str, Any]) -> TopKSAE:
    weights = _read_tensors(path / WEIGHTS_FILE)
    _need(weights, ("W_enc", "b_enc", "W_dec", "b_dec"), path / WEIGHTS_FILE)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    # SAELens before 6 saved TopK SAEs as architecture "standard" with activation_fn_str "topk" (k in activation_fn_kwargs).
    arch = "topk" if cfg.get("activation_fn_str") == "topk" else cfg.get("architecture") or "standard"
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise UserError(f"{path} expects normalize_activations={norm!r}, which needs a scaling factor this loader does not apply; fold it into the weights and set it to 'none'")
    b_enc = weights["b_enc"].float()
    if not cfg.get("apply_b_dec_to_input", True):
        # x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc): fold so we always subtract b_dec.
        b_enc = b_enc + weights["b_dec"].float() @ weights["W_enc"].float()
    W_enc, W_dec = weights["W_enc"].float(), weights["W_dec"].float()
    if cfg.get("rescale_acts_by_decoder_norm") and W_dec.ndim == 2 and W_enc.ndim == 2 and W_dec.shape[0] == W_enc.shape[1] == b_enc.shape[-1]:
        # SAELens scales pre-activations by each latent's decoder norm and divides them back out in decode:
        # folding the norms (as its fold_W_dec_norm) gives the same selection, activations and output
        # with unit decoder rows; a threshold is in the scaled units already
        norms = W_dec.norm(dim=-1).clamp(min=1e-8)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    kwargs_k = (cfg.get("activation_fn_kwargs") or {}).get("k") if isinstance(cfg.get("activation_fn_kwargs"), dict) else None
    n = weights["W_enc"].shape[-1]
    threshold: float | None = None
    if arch == "topk":
        k = cfg.get("k", kwargs_k)
        if not isinstance(k, int):
            raise UserError(f"{path} is a TopK SAE without an integer 'k' in cfg.json; add it and re-load")
    elif arch in ("jumprelu", "standard", "batchtopk"):
        # SAELens's BatchTopK training SAE keeps its threshold as the scalar buffer "topk_threshold".
        thr = weights.get("threshold", weights.get("topk_threshold") if arch == "batchtopk" else None)
        if thr is None and arch != "standard":
            raise UserError(f"{path} is a {arch} SAE without a 'threshold' (or BatchTopK 'topk_threshold') weight; the file is incomplete")
        if thr is not None and not torch.allclose(thr.float(), thr.float().flatten()[0].expand_as(thr.float())):
            raise UserError(f"{path} has per-latent JumpReLU thresholds; only one global threshold (BatchTopK) is supported")
        # A plain ReLU ('standard') SAE is the threshold-0 case of the same rule.
        threshold = float(thr.flatten()[0]) if thr is not None else 0.0
        # Threshold SAEs ignore k at inference; keep the file's k when valid, else a nominal one.
        k = cfg.get("k") if isinstance(cfg.get("k"), int) and 0 < cfg["k"] < n else max(1, min(n - 1, 32))
    else:
        raise UserError(f"{path} has architecture {arch!r}; supported: topk, jumprelu, batchtopk, standard")
    sae = _build(W_enc, b_enc, W_dec, weights["b_dec"], k, path,
                 hook_name=str(cfg.get("hook_name") or meta.get("hook_name") or ""),
                 model=str(cfg.get("model_name") or meta.get("model_name") or ""),
                 threshold=threshold, activation_scale=float(cfg.get("activation_scale") or 1.0))
    if isinstance(cfg.get("extra"), dict):
        sae.extra = dict(cfg["extra"])
    return sae


def _load_sparsify(path: Path, cfg: dict[str, Any]) -> TopKSAE:
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise UserError(f"{path} is a sparsify transcoder or has a skip connection; only plain TopK SAEs load here")
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"{path} uses sparsify activation {cfg.get('activation')!r}; only 'topk' is supported")
    weights = _read_tensors(path / SPARSIFY_WEIGHTS_FILE)
    _need(weights, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / SPARSIFY_WEIGHTS_FILE)
    d_in, k = _need_int(cfg, "d_in", path / "cfg.json"), _need_int(cfg, "k", path / "cfg.json")
    if weights["encoder.weight"].shape[-1] != d_in:
        raise UserError(f"{path}: encoder.weight has width {weights['encoder.weight'].shape[-1]} but cfg.json says d_in={d_in}; the files do not match")
    sae = _build(weights["encoder.weight"].float().T, weights["encoder.bias"], weights["W_dec"], weights["b_dec"], k, path)
    sae.extra = {"source": "sparsify", "hookpoint": path.name}
    return sae


def load(path: str | os.PathLike, device: str | torch.device | None = None, hook_name: str | None = None) -> TopKSAE:
    """Load an SAE directory (ours, SAELens or sparsify) as a :class:`TopKSAE` on ``device``.

    ``hook_name`` overrides the hook recorded in the file (sparsify files record none).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"SAE directory {path} does not exist; pass a directory holding cfg.json and sae_weights.safetensors")
    if not (path / "cfg.json").is_file():
        raise UserError(f"{path} has no cfg.json; it is not an SAE directory (expected cfg.json + sae_weights.safetensors or sae.safetensors)")
    cfg = _read_json(path / "cfg.json")
    if (path / WEIGHTS_FILE).is_file():
        sae = _load_saelens(path, cfg)
    elif (path / SPARSIFY_WEIGHTS_FILE).is_file():
        sae = _load_sparsify(path, cfg)
    else:
        raise UserError(f"{path} has cfg.json but neither {WEIGHTS_FILE} nor {SPARSIFY_WEIGHTS_FILE}; the SAE weights are missing")
    if (path / STATS_FILE).is_file():
        stats = _read_tensors(path / STATS_FILE)
        _need(stats, ("max_activations",), path / STATS_FILE)
        if stats["max_activations"].shape != (sae.n_latents,):
            raise UserError(f"{path / STATS_FILE}: max_activations has shape {tuple(stats['max_activations'].shape)}, expected ({sae.n_latents},); recompute the feature stats")
        sae.max_activations = stats["max_activations"].float()
    if hook_name is not None:
        sae.hook_name = hook_name
    for t in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
        if not torch.isfinite(t).all():
            raise UserError(f"{path} contains NaN or Inf weights; the SAE is broken, retrain or re-download it")
    if sae.threshold is not None and not math.isfinite(sae.threshold):
        raise UserError(f"{path} has a non-finite threshold; the SAE is broken, retrain it")
    return sae.to(device) if device is not None else sae


def from_pretrained(repo_id: str, subfolder: str = "", device: str | torch.device | None = None, hook_name: str | None = None) -> TopKSAE:
    """Download (or reuse from the HF cache) ``repo_id[/subfolder]`` and :func:`load` it; needs network once."""
    subfolder = subfolder.strip("/")
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo_id, allow_patterns=[f"{subfolder}/*" if subfolder else "*"])
    except Exception as err:  # hub errors have many types (offline, 404, auth); all mean "cannot fetch"
        raise UserError(f"cannot fetch SAE {repo_id}{'/' + subfolder if subfolder else ''} from the Hugging Face hub ({type(err).__name__}); check the name and network, or pass a local directory") from err
    return load(Path(root) / subfolder if subfolder else root, device=device, hook_name=hook_name)
