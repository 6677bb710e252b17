"""One training step for a stack of same-shape TopK SAEs, as a function of (params, state, batch).

Objective per stack member (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):

    loss = FVU + aux_coef * AuxK
    FVU  = sum_b ||x_b - x_hat_b||^2 / sum_b ||x_b - mean_b x||^2       (fraction of variance unexplained)
    AuxK = min(n_dead / k_aux, 1) * sum_b ||e_b - e_hat_b||^2 / sum_b ||x_b - mean_b x||^2

where ``e = x - x_hat`` (no gradient) and ``e_hat`` decodes the top ``k_aux`` pre-activations among
*dead* latents (not fired for ``dead_tokens_threshold`` tokens), without ``b_dec``; the
``min(n_dead / k_aux, 1)`` scale is sparsify's. Inputs are pre-scaled so that ``E||x||^2 = d_in``
(:func:`input_scale`). Dead counters and the BatchTopK threshold are explicit state
(:class:`StepState`); the step returns a new state and never mutates the old one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interp.errors import UserError
from saes.distributed import kth_largest_over_ranks, min_over_ranks
from saes.kernels import BufferPool, _numba_for, _triton_for, dense_pre_acts, encode_topk, fused_decode_for, select_pre_acts, sparse_decode, squared_error, topk

__all__ = [
    "DEFAULT_ENC_INIT_SCALE", "StackParams", "StepState", "StepConfig", "init_stack", "check_finite", "is_finite", "init_state", "sae_step_loss",
    "constrain_decoder_grad", "normalize_decoder", "geometric_median", "input_scale",
]


DEFAULT_ENC_INIT_SCALE = 3 ** -0.5
"""Encoder init ``W_enc = s * W_dec^T`` with ``s = 1/sqrt(3)``: the row norm of ``nn.Linear``'s default
init, which Gao et al.'s reference code (openai/sparse_autoencoder, ``train.py``: decoder = encoder
transposed, then only the decoder normalised) and eai-sparsify keep for the encoder. ``s = 1`` is
the exact transpose; it trains to a slightly worse held-out FVU early on (RESULTS.md, "Held-out FVU")."""


class StackParams(nn.Module):
    """Weights of S same-shape SAEs, stacked on a leading axis (training units: inputs pre-scaled).

    The encoder parameter is ``W_enc_t`` ``[S, n, d_in]`` (latent-major, contiguous) and ``W_enc``
    ``[S, d_in, n]`` is its transposed view: the sparse encoder backward produces the gradient
    latent-major, so autograd accumulates it without a transposing copy, and fused Adam (which
    copies non-contiguous parameters in and out on every step) updates it in place.
    """

    def __init__(self, S: int, d_in: int, n_latents: int, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.W_enc_t = nn.Parameter(torch.zeros(S, n_latents, d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(S, n_latents, **kw))
        self.W_dec = nn.Parameter(torch.zeros(S, n_latents, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(S, d_in, **kw))
        self._scratch: dict[str, tuple[tuple, Tensor]] = {}
        self.grad_pool = BufferPool()
        """Memory the CPU backward writes ``W_enc``'s and ``W_dec``'s gradients to, reused once the previous step's are freed."""

    @property
    def W_enc(self) -> Float[Tensor, "S d_in n"]:
        """The encoders ``[S, d_in, n]``: a view of ``W_enc_t`` (writes go through)."""
        return self.W_enc_t.transpose(1, 2)

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str = "pre") -> Tensor:
        """A buffer ``name`` of ``shape`` kept between steps (uninitialised; valid until the next call with the same name)."""
        key = (tuple(shape), dtype, device)
        held = self._scratch.get(name)
        if held is None or held[0] != key:  # one live buffer per name: shapes change rarely
            self._scratch[name] = held = (key, torch.empty(shape, dtype=dtype, device=device))
        return held[1]

    @property
    def S(self) -> int:
        """Number of SAEs in the stack."""
        return self.W_enc.shape[0]

    @property
    def d_in(self) -> int:
        """Input width."""
        return self.W_enc.shape[1]

    @property
    def n_latents(self) -> int:
        """Latents per SAE."""
        return self.W_enc.shape[2]


@dataclass
class StepState:
    """Explicit training state carried from step to step."""

    tokens_since_fired: Tensor
    """``[S, n]`` int64: tokens seen since each latent last had a nonzero activation."""
    threshold: Tensor
    """``[S]`` BatchTopK running threshold (mean smallest kept activation); NaN until the first step."""
    n_steps: int = 0
    """Steps taken so far."""
    dead_count: tuple | None = dataclasses.field(default=None, repr=False, compare=False)
    """CUDA only: ``(tokens_since_fired, dead threshold, pinned host tensor, event)``, the largest
    per-member dead count of this state, copied to the host asynchronously when the state was made.
    The next step reads it instead of stalling the host on the device (AuxK's shapes depend on it);
    it is used only while ``tokens_since_fired`` is still that very tensor."""


@dataclass
class StepConfig:
    """Loss and sparsity settings of one stack."""

    k: int
    """Active latents per token (BatchTopK: on average)."""
    batch_topk: bool = False
    """Select the top ``k * batch`` pre-activations over the whole batch instead of k per token."""
    auxk: bool = True
    """Add the AuxK loss on dead latents."""
    k_aux: int | None = None
    """Latents used by AuxK; None means ``d_in // 2``."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK term."""
    dead_tokens_threshold: int = 10_000_000
    """A latent is dead after this many tokens without firing."""
    threshold_momentum: float = 0.01
    """BatchTopK: weight of the newest batch in the running threshold."""
    max_k_per_token: int | None = None
    """BatchTopK: most latents one token may use (candidates per token); None means ``4 * k``."""
    cpu_bf16_encoder: bool = False
    """CPU: the dense encoder GEMM in bf16 (CUDA always runs it in bf16); fast on CPUs with AMX-BF16."""


def init_state(S: int, n_latents: int, device: str | torch.device | None = None) -> StepState:
    """Fresh state: no latent dead yet, threshold unset."""
    return StepState(torch.zeros(S, n_latents, dtype=torch.int64, device=device), torch.full((S,), math.nan, device=device), 0)


def geometric_median(points: Float[Tensor, "S N d"], iters: int = 100, eps: float = 1e-8, tol: float = 1e-6) -> Float[Tensor, "S d"]:
    """Per-member geometric median by Weiszfeld's algorithm (weights ``1 / ||p - m||``)."""
    points = points.double()
    median = points.mean(1)
    for _ in range(iters):
        weights = 1.0 / (points - median[:, None]).norm(dim=-1).clamp_min(eps)
        new = torch.einsum("sn,snd->sd", weights, points) / weights.sum(1, keepdim=True)
        moved = (new - median).norm(dim=-1).max()
        median = new
        if moved < tol:
            break
    return median.float()


def input_scale(sample: Float[Tensor, "S N d"]) -> Float[Tensor, "S"]:
    """The factor ``c`` with ``E||c x||^2 = d_in`` on ``sample``."""
    if not torch.isfinite(sample).all():
        raise UserError("the activation sample contains NaN or Inf; re-harvest the activations")
    mean_sq = sample.double().pow(2).sum(-1).mean(1)
    if (mean_sq <= 0).any():
        raise UserError("the activation sample is all zeros; check the hook name and the activations")
    return (sample.shape[-1] / mean_sq).sqrt().float()


def init_stack(
    S: int, d_in: int, n_latents: int, sample: Float[Tensor, "S N d"] | None = None,
    b_dec_init: str = "geometric_median", seed: int = 0, device: str | torch.device | None = None,
    enc_init_scale: float = DEFAULT_ENC_INIT_SCALE,
) -> StackParams:
    """Random unit-norm decoder rows, ``W_enc = enc_init_scale * W_dec^T``, ``b_enc = 0``, ``b_dec`` from ``sample``.

    ``sample`` holds already-scaled activations per member; without it ``b_dec = 0``. The default
    scale is :data:`DEFAULT_ENC_INIT_SCALE` (1/sqrt(3), the tied init of Gao et al.'s reference
    code and of eai-sparsify); 1 is the exact transpose.
    """
    if b_dec_init not in ("geometric_median", "mean"):
        raise UserError(f"b_dec_init must be 'geometric_median' or 'mean', got {b_dec_init!r}")
    if not (math.isfinite(enc_init_scale) and enc_init_scale > 0):
        raise UserError(f"enc_init_scale must be > 0, got {enc_init_scale}")
    if sample is not None and tuple(sample.shape[::2]) != (S, d_in):
        raise UserError(f"init sample has shape {tuple(sample.shape)}, expected [{S}, N, {d_in}]; pass one sample per stack member")
    params = StackParams(S, d_in, n_latents, device=device)
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(S, n_latents, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        params.W_dec.copy_(W_dec)
        params.W_enc.copy_(enc_init_scale * W_dec.transpose(1, 2))
        if sample is not None:
            params.b_dec.copy_(geometric_median(sample) if b_dec_init == "geometric_median" else sample.float().mean(1))
    return params


NON_FINITE_BATCH = "the activation batch contains NaN or Inf; re-harvest the activations (or check the hook)"


def is_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite (a host sync on CUDA)."""
    # A finite sum means every entry is finite (NaN and Inf propagate), in one cheap pass; a
    # non-finite sum (bad entries, or an overflow of large finite ones) gets the exact check.
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_finite(x: Tensor) -> None:
    """One-line error for NaN/Inf activations (a host sync on CUDA: the trainer checks host batches instead)."""
    if not is_finite(x):
        raise UserError(NON_FINITE_BATCH)


def _check(params: StackParams, x: Tensor, cfg: StepConfig) -> None:
    S, d, n = params.S, params.d_in, params.n_latents
    if not 0 < cfg.k < n:
        raise UserError(f"k must satisfy 0 < k < n_latents (got k={cfg.k}, n_latents={n}); lower --k or raise --latents")
    if x.ndim != 3 or x.shape[0] != S or x.shape[2] != d:
        raise UserError(f"batch has shape {tuple(x.shape)}, expected [{S}, batch, {d}]; the activations' width does not match the SAE's d_in")
    if not x.is_cuda:  # on CUDA this would stall the host once per step; the trainer checks its host batches
        check_finite(x)


def _centered_sum_sq(xc: Tensor) -> Tensor:
    """``sum_b ||x_b - mean_b x||^2`` per member from ``xc = x - b_dec`` (shift-invariant), without writing a pass.

    ``sum ||xc||^2 - B ||mean xc||^2`` accumulated in float64 (rows' squared norms in the input
    dtype): with ``b_dec`` near the data's centre the two terms differ by orders of magnitude;
    float32 inputs offset by 100 standard deviations still come within 1e-4 (a test).
    """
    B = xc.shape[1]
    if (ck := _numba_for(xc)) is not None:  # one compiled pass, float64 throughout
        col_sum, sq_sum = ck.centered_stats(xc)
        return (sq_sum - col_sum.pow(2).sum(-1) / B).to(xc.dtype)
    mean = xc.sum(1, dtype=torch.float64) / B
    return (torch.linalg.vecdot(xc, xc).double().sum(1) - B * mean.pow(2).sum(-1)).to(xc.dtype)


def _pre_buffers(params: StackParams, x: Tensor, cfg: StepConfig) -> dict[str, Tensor | tuple[Tensor, Tensor]]:
    """On CPU, reused buffers for :func:`saes.kernels.dense_pre_acts`: the ``[S, B, n]`` output and
    its GEMM's bias-augmented operands ``[S, B, d + 1]`` and ``[S, n, d + 1]`` (CUDA's caching
    allocator already reuses memory: nothing there). The encoder's augmented copy stays allocated
    between steps: one more ``S * n * (d + 1)`` floats of memory on CPU. With
    ``cfg.cpu_bf16_encoder`` all three are bf16: the GEMM runs in bf16 and the pre-activations stay
    bf16 (the CPU top-k reads them as bit patterns; the selected values are widened)."""
    if x.is_cuda:
        return {}
    (S, B, d), n = x.shape, params.n_latents
    dt = torch.bfloat16 if cfg.cpu_bf16_encoder else params.W_enc.dtype
    return {"out": params.scratch((S, B, n), dt, x.device),
            "operands": (params.scratch((S, B, d + 1), dt, x.device, "x_aug"), params.scratch((S, n, d + 1), dt, x.device, "w_aug"))}


def _batch_topk(params: StackParams, x: Tensor, xc: Tensor, cfg: StepConfig, attach: bool = True,
                world: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top ``k * B`` pre-activations over the batch, from the best ``max_k_per_token`` per token.

    Returns ``(values [S,B,c], indices [S,B,c], pre [S,B,n], smallest kept activation [S])``;
    unkept candidates have value 0. ``attach=False``: the values carry no gradient (the fused decoder's case).
    ``world > 1``: ``x`` is one rank's slice of a global batch of ``world * B`` rows, and the cut and
    the smallest kept activation are those of the global batch (collectives over the ranks).
    """
    n, (S, B, _) = params.n_latents, x.shape
    pre = dense_pre_acts(x, params.W_enc, params.b_enc, params.b_dec, x_centered=xc, **_pre_buffers(params, x, cfg))
    per_token = min(n, cfg.max_k_per_token or 4 * cfg.k)
    top, indices = topk(pre, per_token)
    top = top.to(params.W_enc.dtype)
    flat = top.reshape(S, -1)
    keep_n = min(cfg.k * B, flat.shape[1]) * world
    if world > 1:
        kth = kth_largest_over_ranks(flat, keep_n, world)
    else:  # the (k*B)-th largest candidate: kthvalue counts from the smallest
        kth = flat.kthvalue(flat.shape[1] - keep_n + 1, dim=1).values
    keep = (top >= kth.view(S, 1, 1)) & (top > 0)
    smallest = min_over_ranks(torch.where(keep, top, torch.full_like(top, math.inf)).amin(dim=(1, 2)), world)
    if not attach:
        return top * keep, indices, pre, smallest
    values = select_pre_acts(top, indices, x, params.W_enc, params.b_enc, params.b_dec, xc, params.grad_pool) * keep
    return values, indices, pre, smallest


def _auxk(params: StackParams, x: Tensor, xc: Tensor, pre: Tensor, residual: Tensor, dead: Tensor, n_dead: Tensor, m: int, cfg: StepConfig) -> Tensor:
    """AuxK reconstruction error of ``residual`` from the top dead latents, per member, unnormalized.

    ``n_dead`` [S] counts each member's dead latents and ``m >= 1`` is its maximum (on the host).
    """
    S, B, d = x.shape
    k_aux = min(cfg.k_aux or d // 2, params.n_latents)
    k_eff = min(k_aux, m)
    if m <= params.n_latents // 2:
        # Few dead latents: select among their columns only (S x B x m, not S x B x n).
        dead_idx = dead.to(torch.int8).topk(m, dim=1).indices
        cand = pre.gather(2, dead_idx.unsqueeze(1).expand(S, B, m)).masked_fill(~dead.gather(1, dead_idx).unsqueeze(1), -math.inf)
        top, pos = topk(cand, k_eff)
        indices = dead_idx.gather(1, pos.reshape(S, -1)).reshape(S, B, k_eff)
    else:
        top, indices = topk(pre.masked_fill(~dead.unsqueeze(1), -math.inf), k_eff)
    valid = torch.isfinite(top)
    top = torch.where(valid, top, torch.zeros_like(top)).to(params.W_enc.dtype)
    values = select_pre_acts(top, indices, x, params.W_enc, params.b_enc, params.b_dec, xc, params.grad_pool).relu()
    e_hat = sparse_decode(values, indices, params.W_dec, params.grad_pool)
    scale = (n_dead.to(x.dtype) / k_aux).clamp(max=1.0)
    return scale * (e_hat - residual).pow(2).sum((1, 2))


def sae_step_loss(
    params: StackParams, state: StepState, x: Float[Tensor, "S B d"], cfg: StepConfig,
    *, total_variance: Float[Tensor, "S"] | None = None, world: int = 1,
) -> tuple[Tensor, dict[str, Tensor], StepState]:
    """Loss (summed over the stack), per-member metrics and the next state for one batch.

    ``x`` is already scaled (``E||x||^2 = d_in``). Metrics, each ``[S]``: ``fvu``, ``l0`` (mean
    active latents per token), ``dead_fraction`` (after this batch) and ``auxk_loss``. On CUDA
    the encoder GEMM runs in bf16 with TF32 enabled; on CPU everything is fp32.

    ``total_variance`` is the FVU and AuxK denominator ``sum_b ||x_b - mean_b x||^2`` of a larger
    global batch that ``x`` is one slice of (data parallelism); the loss, ``fvu`` and ``auxk_loss``
    of the slices then add up to those of the global batch. None uses the variance of ``x`` itself.
    ``world``: the number of equal slices (ranks) of that global batch; BatchTopK then selects over
    the global batch (see :func:`_batch_topk`), so every rank computes the single-process threshold.
    """
    _check(params, x, cfg)
    if x.is_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    x = x.to(params.W_enc.dtype)
    S, B, _ = x.shape
    n = params.n_latents
    threshold = state.threshold
    xc = x - params.b_dec.detach().unsqueeze(1)  # one pass shared by the encoder backward, the FVU and its variance
    fused = fused_decode_for(x)  # CUDA with INTERP_TRITON_FUSED=1: one kernel for the sparse backward
    if cfg.batch_topk:
        values, indices, pre, smallest = _batch_topk(params, x, xc, cfg, attach=fused is None, world=world)
        smallest = torch.where(torch.isfinite(smallest), smallest, threshold)
        first = torch.isnan(threshold)
        threshold = torch.where(first, smallest, threshold + cfg.threshold_momentum * (smallest - threshold))
    else:
        values, indices, pre = encode_topk(x, params.W_enc, params.b_enc, params.b_dec, cfg.k, x_centered=xc, attach=fused is None,
                                           grad_pool=params.grad_pool, **_pre_buffers(params, x, cfg))
    if total_variance is None:
        total_variance = _centered_sum_sq(xc)
    assert total_variance.shape == (S,), f"total_variance must be [S]={S}, got {tuple(total_variance.shape)}"
    total_variance = total_variance.to(x.dtype).clamp_min(1e-12)
    if fused is not None:
        decoded = fused.decode_selected(values, indices, xc, params.W_enc, params.b_enc, params.b_dec, params.W_dec)
    else:
        decoded = sparse_decode(values, indices, params.W_dec, params.grad_pool)
    sq_error, diff = squared_error(decoded, xc, params.b_dec)  # diff = x_hat - x
    fvu = sq_error / total_variance

    dead = state.tokens_since_fired >= cfg.dead_tokens_threshold
    n_dead = dead.sum(1)
    m = _max_dead(state, n_dead, cfg) if cfg.auxk else 0
    if m > 0:
        auxk = _auxk(params, x, xc, pre, diff.neg(), dead, n_dead, m, cfg) / total_variance
    else:
        auxk = torch.zeros_like(fvu)
    loss = (fvu + cfg.aux_coef * auxk).sum()

    active = values.detach() > 0
    # Inactive picks write to a spare slot: no boolean indexing (a host sync on CUDA).
    flat = torch.where(active, indices + torch.arange(S, device=x.device).view(S, 1, 1) * n, S * n)
    fired = torch.zeros(S * n + 1, dtype=torch.bool, device=x.device)
    fired[flat.reshape(-1)] = True
    fired = fired[:-1].view(S, n)
    since = torch.where(fired, torch.zeros_like(state.tokens_since_fired), state.tokens_since_fired + B)
    dead_after = since >= cfg.dead_tokens_threshold
    metrics = {
        "fvu": fvu.detach(),
        "l0": active.sum(-1).to(x.dtype).mean(1),
        "dead_fraction": dead_after.to(x.dtype).mean(1),
        "auxk_loss": auxk.detach(),
    }
    prefetch = _prefetch_dead_count(since, dead_after, cfg) if cfg.auxk and since.is_cuda else None
    return loss, metrics, dataclasses.replace(state, tokens_since_fired=since, threshold=threshold.detach(), n_steps=state.n_steps + 1,
                                              dead_count=prefetch)


def _prefetch_dead_count(since: Tensor, dead: Tensor, cfg: StepConfig) -> tuple:
    """Start copying ``max_s #dead latents`` (``dead = since >= threshold``) to pinned host memory; see ``StepState.dead_count``."""
    count = dead.sum(1).max().reshape(1)
    host = torch.empty(1, dtype=count.dtype, pin_memory=True)
    host.copy_(count, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return since, cfg.dead_tokens_threshold, host, event


def _max_dead(state: StepState, n_dead: Tensor, cfg: StepConfig) -> int:
    """``max(n_dead)`` on the host: the prefetched copy when it belongs to this state, else a sync."""
    if state.dead_count is not None:
        since, threshold, host, event = state.dead_count
        if since is state.tokens_since_fired and threshold == cfg.dead_tokens_threshold:
            event.synchronize()  # waits for the previous step's forward only, not its backward
            return int(host[0])
    return int(n_dead.max())


@torch.no_grad()
def constrain_decoder_grad(params: StackParams) -> None:
    """Remove from ``W_dec.grad`` each row's component parallel to that (unit) decoder row."""
    grad, w = params.W_dec.grad, params.W_dec
    if grad is not None and (tk := _triton_for(grad)) is not None and grad.is_contiguous():
        tk.constrain_rows(grad, w.detach())
    elif grad is not None and grad.is_contiguous() and (ck := _numba_for(grad, w)) is not None:
        ck.constrain_rows(grad, w.detach())
    elif grad is not None:
        grad.addcmul_(torch.linalg.vecdot(grad, w).unsqueeze(-1), w, value=-1.0)


@torch.no_grad()
def normalize_decoder(params: StackParams) -> None:
    """Rescale every decoder row to unit norm (call after ``optimizer.step()``)."""
    if (tk := _triton_for(params.W_dec)) is not None:
        tk.normalize_rows(params.W_dec.data)
        return
    if params.W_dec.is_contiguous() and (ck := _numba_for(params.W_dec)) is not None:
        ck.normalize_rows(params.W_dec.data)
        return
    params.W_dec.div_(torch.linalg.vector_norm(params.W_dec, dim=-1, keepdim=True).clamp_min_(1e-12))
