"""Honest SAE metrics: reconstruction, sparsity, feature density and downstream loss.

All statistics are over the non-special evaluation tokens (see :mod:`saes.sources`) of the
*held-out* corpus split, or over the first ``n_tokens`` rows of an activation store. With
``x`` the activations, ``x_hat`` the reconstruction, ``f`` the feature activations and sums over
the ``N`` tokens:

- ``l0 = (1/N) sum_t #{i : f_ti > 0}``
- ``mse = (1/(N d_in)) sum_t ||x_t - x_hat_t||^2``
- ``normalized_mse = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t||^2`` (error relative to predicting 0)
- ``fvu = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2`` (fraction of variance unexplained:
  error relative to predicting the mean; Gao et al. 2024 report this ratio as "normalized MSE");
  ``explained_variance = 1 - fvu``
- ``frequency_i = (1/N) #{t : f_ti > 0}``; ``dead_fraction`` = share of latents with frequency 0
  over this token window, ``dense_fraction`` = share with frequency > ``dense_threshold``
- ``ce_loss_clean / _spliced / _zero_ablated``: mean next-token cross-entropy (nats) over the
  predictions whose target token is not special, with the hook untouched, replaced by ``x_hat``,
  and set to 0 at the non-special positions (special positions always keep their clean value);
  ``ce_loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)``
- ``kl_clean_spliced = mean_t KL(p_clean || p_spliced)`` (and ``kl_clean_zero`` likewise).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import UserError
from interp.files import atomic_write_json, save_safetensors_atomic
from saes.sources import batched, check_hook, hook_activations, progress_bar, sae_device, special_mask, token_windows
from saes.splicing import Splicer, next_token_logprobs, next_token_terms

__all__ = ["evaluate", "EVAL_FILE", "density_histogram"]

EVAL_FILE = "eval.json"
_SAVE_EVERY_S = 60.0  # how often an evaluation with an output file saves its running sums


class _Reconstruction:
    """Streaming sums behind l0, mse, normalized_mse, fvu and the firing frequencies."""

    def __init__(self, d_in: int, n_latents: int):
        self.n = 0
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64)
        self.active = 0
        self.fire_counts = torch.zeros(n_latents, dtype=torch.long)

    def update(self, x: Float[Tensor, "n d_in"], f: Float[Tensor, "n n_latents"], x_hat: Float[Tensor, "n d_in"]) -> None:
        x, x_hat = x.double(), x_hat.to(x.device, torch.float64)  # the SAE may sit on another device
        fired = f > 0
        self.n += x.shape[0]
        self.sse += float(((x - x_hat) ** 2).sum())
        self.sum_sq += float((x**2).sum())
        self.sum_x += x.sum(0).cpu()
        self.active += int(fired.sum())
        self.fire_counts += fired.sum(0).cpu()

    def state(self) -> dict[str, Tensor]:
        """Tensors that restore this accumulator with :meth:`restore` (for resuming)."""
        scalars = torch.tensor([self.n, self.sse, self.sum_sq, self.active], dtype=torch.float64)
        return {"recon_scalars": scalars, "recon_sum_x": self.sum_x, "recon_fire_counts": self.fire_counts}

    def restore(self, state: dict[str, Tensor]) -> None:
        """Load sums saved by :meth:`state`."""
        n, self.sse, self.sum_sq, active = state["recon_scalars"].tolist()
        self.n, self.active = int(n), int(active)
        self.sum_x = state["recon_sum_x"].double()
        self.fire_counts = state["recon_fire_counts"].long()

    def metrics(self, dense_threshold: float) -> dict[str, Any]:
        n, d = self.n, self.sum_x.numel()
        # sum ||x - mean||^2 = sum ||x||^2 - N ||mean||^2 (float64 sums keep the cancellation exact enough)
        total_var = self.sum_sq - float((self.sum_x**2).sum()) / n
        freq = self.fire_counts.double() / n
        fvu = self.sse / total_var if total_var > 0 else float("nan")
        return {
            "n_tokens": n,
            "l0": self.active / n,
            "mse": self.sse / (n * d),
            "normalized_mse": self.sse / self.sum_sq if self.sum_sq > 0 else float("nan"),
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "dense_fraction": float((freq > dense_threshold).double().mean()),
            "dense_threshold": dense_threshold,
            "token_window": n,
            "density_histogram": density_histogram(self.fire_counts, n),
        }


def density_histogram(fire_counts: Tensor, n_tokens: int, bins_per_decade: int = 4) -> dict[str, Any]:
    """Histogram of log10(firing frequency) of the latents that fired; dead latents counted apart.

    Bin edges run from ``floor(log10(1 / n_tokens))`` to 0 in steps of ``1 / bins_per_decade``.
    """
    alive = fire_counts[fire_counts > 0].double() / n_tokens
    low = math.floor(math.log10(1.0 / n_tokens))
    edges = torch.linspace(low, 0.0, -low * bins_per_decade + 1, dtype=torch.float64)
    idx = torch.bucketize(alive.log10(), edges[1:-1], right=True) if alive.numel() else torch.empty(0, dtype=torch.long)
    counts = torch.bincount(idx, minlength=len(edges) - 1)
    return {"log10_bin_edges": [round(float(e), 6) for e in edges], "counts": counts.tolist(), "n_dead": int((fire_counts == 0).sum())}


def _encode_decode(sae: Any, x: Float[Tensor, "n d_in"]) -> tuple[Tensor, Tensor]:
    with torch.inference_mode():
        x = x.to(sae_device(sae))
        f = sae.encode(x)
        return f, sae.decode(f)


def evaluate(
    sae: Any,
    model: Any,
    corpus_or_store: Any = "default",
    n_tokens: int = 65_536,
    ctx: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    dense_threshold: float = 0.1,
    ce: bool = True,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``sae`` on ``n_tokens`` held-out tokens; formulas in the module docstring.

    ``sae`` is a FeatureDictionary or an SAE directory (then ``eval.json`` is written beside it unless
    ``out`` says where). ``corpus_or_store`` is a corpus name/path/``Corpus`` (its ``eval`` split), a
    ``LongTensor [n_windows, ctx]`` of windows, or an ``ActivationStore`` (metrics on its first
    ``n_tokens`` rows, CE terms on the windows those rows came from). ``model`` may be None only with
    a store and ``ce=False``. ``batch_size`` counts windows of ``ctx`` tokens.
    """
    from interp.store import ActivationStore

    if isinstance(sae, (str, os.PathLike)):
        from saes.io import load

        sae_dir = Path(sae)
        sae = load(sae_dir)
        out = sae_dir / EVAL_FILE if out is None else out
    if not 0 < dense_threshold <= 1:
        raise UserError(f"dense threshold must be in (0, 1] (got {dense_threshold})")
    hook = getattr(sae, "hook_name", "")
    if not hook:
        raise UserError("the SAE does not name its hook (hook_name is empty); set it in cfg.json or pass hook_name when loading")
    if model is None and (ce or not isinstance(corpus_or_store, ActivationStore)):
        raise UserError("a model is needed for CE-loss terms and for corpus input; pass --model, or evaluate a store with ce=False")
    if model is not None:
        check_hook(model, hook)
    n_latents, d_in = sae.W_dec.shape
    recon = _Reconstruction(d_in, n_latents)
    result: dict[str, Any] = {"hook_name": hook, "model": _name_of(model, sae), "n_latents": int(n_latents), "d_in": int(d_in), "k": getattr(sae, "k", None), "ctx": ctx, "seed": seed}
    if isinstance(corpus_or_store, ActivationStore):
        if model is not None and corpus_or_store.model not in ("unknown", _name_of(model, sae)):
            raise UserError(f"the store at {corpus_or_store.path} holds activations of model {corpus_or_store.model!r}, not {_name_of(model, sae)!r}; "
                            f"pass --model {corpus_or_store.model} or a store harvested from this model")
        windows = _store_pass(sae, corpus_or_store, hook, n_tokens, batch_size * ctx, recon, want_windows=ce, progress=progress)
        result["source"] = f"store:{corpus_or_store.path}"
        result["ctx"] = corpus_or_store.manifest.get("ctx")
        result.update(recon.metrics(dense_threshold))
        if ce:
            result.update(_ce_pass(sae, model, hook, windows, batch_size, None, progress, partial=_partial_path(out)))
    else:
        windows, described = token_windows(model, corpus_or_store, n_tokens, ctx, seed)
        result["source"] = described
        result["ctx"] = int(windows.shape[1])
        result.update(_ce_pass(sae, model, hook, windows, batch_size, recon, progress, ce=ce, partial=_partial_path(out)))
        result.update(recon.metrics(dense_threshold))
        result["n_tokens"] = recon.n
    # NaN (e.g. FVU of constant activations) becomes null so that eval.json stays strict JSON.
    result = {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in result.items()}
    if out is not None:
        atomic_write_json(out, result)
    return result


def _partial_path(out: str | os.PathLike | None) -> Path | None:
    """Where the running sums of an evaluation writing ``out`` are kept until it finishes."""
    return None if out is None else Path(str(out) + ".partial.safetensors")


def _load_partial(partial: Path | None, key: str) -> dict[str, Tensor] | None:
    """The saved sums of an interrupted run with the same key, else None (a stale file is ignored)."""
    if partial is None or not partial.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(partial), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return None
            return {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError):
        return None


def _name_of(model: Any, sae: Any) -> str:
    if model is None:
        return str(getattr(sae, "model", "") or "unknown")
    from interp.models import model_name

    return model_name(model)


def _store_pass(sae: Any, store: Any, hook: str, n_tokens: int, chunk: int, recon: _Reconstruction, want_windows: bool, progress: bool) -> Tensor:
    """Reconstruction metrics over store rows ``[0, n_tokens)``; returns the distinct windows behind them."""
    if hook not in store.hooks:
        raise UserError(f"the store at {store.path} has no activations for {hook!r} (it holds {', '.join(store.hooks)}); harvest that hook first")
    if n_tokens <= 0:
        raise UserError(f"the token budget must be positive (got {n_tokens}); pass --tokens N with N > 0")
    n = min(n_tokens, store.n_tokens)
    windows: list[Tensor] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("eval (store rows)", total=n)
        for start, stop in batched(n, chunk):
            x = store.read(hook, start, stop)
            f, x_hat = _encode_decode(sae, x)
            recon.update(x, f, x_hat)
            if want_windows:
                w, _ = store.windows(torch.arange(start, stop))
                windows.append(torch.unique_consecutive(w, dim=0))
            bar.advance(task, stop - start)
    if not want_windows:
        return torch.empty(0, 0, dtype=torch.long)
    out = torch.unique_consecutive(torch.cat(windows), dim=0)
    if out.ndim != 2 or out.shape[1] < 2:
        raise UserError(f"the store at {store.path} keeps no token windows, so CE terms cannot be computed; evaluate with ce=False (--no-ce) or re-harvest")
    return out


def _batch_terms(sae: Any, model: Any, splicer: Splicer, tokens: Tensor, recon: _Reconstruction | None, ce: bool) -> tuple[Tensor, int]:
    """One batch: update ``recon``; return the summed (ce_clean, ce_spliced, ce_zero, kl_spliced, kl_zero) and the prediction count."""
    keep = ~special_mask(model, tokens)
    if ce:
        logits, x = splicer.clean(tokens)
    else:
        x = hook_activations(model, tokens, splicer.hook_name)  # stops after the hook's block
    keep = keep.to(x.device)
    f, x_hat = _encode_decode(sae, x[keep])
    if recon is not None:
        recon.update(x[keep], f, x_hat)
    if not ce:
        return torch.zeros(5, dtype=torch.float64), 0
    spliced, zeroed = x.clone(), x.clone()
    spliced[keep] = x_hat.to(x.device, x.dtype)
    zeroed[keep] = 0.0
    target_mask = keep[:, 1:]
    targets = tokens[:, 1:].to(target_mask.device)[target_mask]
    clean_lp = next_token_logprobs(logits, target_mask)
    ce_clean, _ = next_token_terms(clean_lp, None, targets)
    ce_spliced, kl_spliced = next_token_terms(clean_lp, next_token_logprobs(splicer.replaced(tokens, spliced), target_mask), targets)
    ce_zero, kl_zero = next_token_terms(clean_lp, next_token_logprobs(splicer.replaced(tokens, zeroed), target_mask), targets)
    return torch.stack([ce_clean, ce_spliced, ce_zero, kl_spliced, kl_zero]).cpu(), int(target_mask.sum())


def _resume_key(sae: Any, hook: str, windows: Tensor, batch_size: int, ce: bool, with_recon: bool) -> str:
    """Identifies an evaluation run: SAE weights, windows, hook and batching must all match to resume."""
    digest = hashlib.sha256(f"{hook}|{batch_size}|{ce}|{with_recon}|{tuple(windows.shape)}".encode())
    digest.update(sae.W_dec.detach().float().cpu().numpy().tobytes())
    with torch.inference_mode():
        probe = torch.linspace(-1.0, 1.0, sae.W_dec.shape[1], device=sae_device(sae))[None]
        digest.update(sae.encode(probe).float().cpu().numpy().tobytes())
    digest.update(windows.cpu().numpy().tobytes())
    return digest.hexdigest()


def _ce_pass(
    sae: Any, model: Any, hook: str, windows: Tensor, batch_size: int, recon: _Reconstruction | None, progress: bool,
    ce: bool = True, partial: Path | None = None,
) -> dict[str, Any]:
    """Run ``windows`` through the model: reconstruction sums (when ``recon``) and CE/KL terms (when ``ce``).

    With ``partial``, the running sums are saved there every minute and on Ctrl-C, and a later call
    with the same SAE, windows and batching resumes from them; the file is removed when done.
    """
    splicer = Splicer(model, hook)
    sums = torch.zeros(5, dtype=torch.float64)  # ce_clean, ce_spliced, ce_zero, kl_spliced, kl_zero
    n_predictions = 0
    first = 0
    key = _resume_key(sae, hook, windows, batch_size, ce, recon is not None) if partial is not None else ""
    saved = _load_partial(partial, key)
    if saved is not None:
        first, n_predictions = int(saved["next"]), int(saved["n_predictions"])
        sums = saved["sums"].double()
        if recon is not None:
            recon.restore(saved)

    def checkpoint(next_window: int) -> None:
        state = {"sums": sums, "next": torch.tensor(next_window), "n_predictions": torch.tensor(n_predictions)}
        save_safetensors_atomic(partial, {**state, **(recon.state() if recon is not None else {})}, metadata={"key": key})

    last_save, done = time.monotonic(), first
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("eval (model)", total=windows.shape[0], completed=first)
            for start, stop in batched(windows.shape[0], batch_size):
                if start < first:
                    continue
                if partial is not None and time.monotonic() - last_save > _SAVE_EVERY_S:
                    checkpoint(start)
                    last_save = time.monotonic()
                batch_sums, batch_predictions = _batch_terms(sae, model, splicer, windows[start:stop], recon, ce)
                sums += batch_sums
                n_predictions += batch_predictions
                done = stop
                bar.advance(task, stop - start)
    except KeyboardInterrupt:
        if partial is not None:
            checkpoint(done)
        raise
    if partial is not None and partial.exists():
        partial.unlink()
    if not ce:
        return {}
    if n_predictions == 0:
        raise UserError("no tokens to evaluate the CE loss on; raise --tokens")
    clean, spliced, zero, kl_s, kl_z = (float(v) / n_predictions for v in sums)
    recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
    return {
        "ce_loss_clean": clean,
        "ce_loss_spliced": spliced,
        "ce_loss_zero_ablated": zero,
        "ce_loss_recovered": recovered,
        "kl_clean_spliced": kl_s,
        "kl_clean_zero": kl_z,
        "n_ce_predictions": n_predictions,
    }
