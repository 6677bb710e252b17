"""What an SAE training run is: one dataclass driving the library call, the CLI and the TOML file.

A run trains one SAE per (hook, setting) pair; a setting is ``(n_latents, k)``. Validation that
needs only the config happens in :meth:`TrainConfig.validate`; the hooks are checked against the
data in :meth:`TrainConfig.check_hooks`. Both raise :class:`UserError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from interp.configparse import parse_dataclass
from interp.errors import UserError, suggest
from saes.step import DEFAULT_ENC_INIT_SCALE

__all__ = ["TrainConfig", "default_lr", "sae_name"]

DIST_MODES = ("none", "ddp", "shard")
B_DEC_INITS = ("geometric_median", "mean")

DEFAULT_DEAD_TOKENS = 10_000_000
"""Gao et al.'s (and sparsify's) dead-latent window; runs shorter than 100M tokens use a tenth of their length."""
# Fields that change how a run is watched or saved, not what it computes: a resumed run may change them.
_NOT_HASHED = ("checkpoint_every", "log_every", "keep_checkpoints", "device", "progress")


def default_lr(n_latents: int) -> float:
    """Default Adam learning rate 2e-4 / sqrt(n_latents / 2**14) (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def sae_name(hook: str, n_latents: int, k: int) -> str:
    """Directory name of the SAE trained on ``hook`` with ``n_latents`` latents and TopK ``k``."""
    return f"{hook}-n{n_latents}-k{k}"


@dataclass
class TrainConfig:
    """Everything that defines an SAE training run (same fields as the CLI flags and the TOML file)."""

    hooks: list[str] = field(default_factory=list)
    """Hook names to train on, e.g. ``blocks.6.hook_resid_post``; every SAE sees the same rows."""
    settings: list[tuple[int, int]] = field(default_factory=lambda: [(4096, 32)])
    """``(n_latents, k)`` pairs; each is trained on every hook, all together in one pass over the data."""
    n_tokens: int = 10_000_000
    """Training tokens (rows) per SAE; more than the store holds rolls into reshuffled epochs."""
    batch_size: int = 4096
    """Rows per optimizer step (the global batch: split over ranks under ``dist='ddp'``)."""
    lr: float | None = None
    """Adam learning rate; None means :func:`default_lr` of each setting's ``n_latents``."""
    warmup_frac: float = 0.01
    """Fraction of the steps over which the learning rate rises linearly from 0."""
    decay_frac: float = 0.2
    """Fraction of the steps at the end over which the learning rate decays linearly to 0."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    seed: int = 0
    """Seed for initialisation and for the order of rows."""
    batch_topk: bool = False
    """Train with BatchTopK (top k*batch over the batch) and save its inference threshold."""
    auxk: bool = True
    """Add the AuxK loss on dead latents (Gao et al. 2024)."""
    k_aux: int | None = None
    """Latents used by AuxK; None means d_in // 2."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens_threshold: int | None = None
    """A latent that has not fired for this many tokens counts as dead (AuxK trains it; ``dead_fraction``
    counts it). None: :meth:`dead_tokens`'s rule, a tenth of the run capped at Gao et al.'s 10M."""
    threshold_momentum: float = 0.01
    """BatchTopK: weight of the newest batch in the running inference threshold."""
    batch_topk_cap: int | None = None
    """BatchTopK: most latents one token may take in the batch's top ``k * B`` (candidates per token).
    None means ``4 * k`` (fast; equal to the exact rule whenever no token would take more); ``n_latents``
    or more is the exact rule."""
    b_dec_init: str = "geometric_median"
    """Decoder bias init from a sample: 'geometric_median' or 'mean'."""
    enc_init_scale: float = DEFAULT_ENC_INIT_SCALE
    """Encoder init ``W_enc = enc_init_scale * W_dec^T``: 1/sqrt(3) (the default) is the tied init of
    Gao et al.'s reference code and of eai-sparsify (``saes.step.DEFAULT_ENC_INIT_SCALE``); 1 is the exact transpose."""
    cpu_bf16_encoder: bool = False
    """CPU: run the dense encoder GEMM in bf16 (selection on bf16-rounded pre-activations, as on CUDA).
    Fast only on CPUs with AMX-BF16 (7x the fp32 GEMM on a 2-core Xeon); elsewhere bf16 is far slower."""
    init_sample_rows: int = 4096
    """Rows read per hook to estimate the input scaling factor and initialise b_dec."""
    checkpoint_every: int = 1000
    """Write an atomic checkpoint every this many steps (0 disables checkpoints)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep on disk."""
    log_every: int = 10
    """Write metrics.jsonl rows every this many steps (and at the last step)."""
    dist: str = "none"
    """Distributed mode under torchrun: 'none', 'ddp' (data-parallel) or 'shard' (SAEs spread over ranks)."""
    device: str | None = None
    """Torch device; None picks CUDA when available, else CPU."""
    buffer_rows: int = 2**18
    """Shuffle-buffer rows when reading an activation store."""
    ctx: int = 128
    """Context length of token windows when harvesting from a live model."""
    model_batch_size: int = 8
    """Windows per forward pass when harvesting from a live model."""
    corpus: str = "default"
    """Corpus name or path used when training straight from a live model."""
    progress: bool = True
    """Show a rich progress bar."""

    def __post_init__(self) -> None:
        self.hooks = list(self.hooks)
        self.settings = [(int(n), int(k)) for n, k in self.settings]
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))

    @property
    def n_steps(self) -> int:
        """Optimizer steps in the run: ``n_tokens // batch_size``."""
        return self.n_tokens // self.batch_size

    def dead_tokens(self) -> int:
        """The dead-latent window in tokens: ``dead_tokens_threshold``, else ``min(10M, n_tokens // 10)``
        and at least one batch. A fixed 10M (Gao et al., sparsify) never fires in a run shorter than
        that, which would leave AuxK and ``dead_fraction`` idle in every run of under 10M tokens."""
        if self.dead_tokens_threshold is not None:
            return self.dead_tokens_threshold
        return max(self.batch_size, min(DEFAULT_DEAD_TOKENS, self.n_tokens // 10))

    def lr_for(self, n_latents: int) -> float:
        """Peak learning rate for SAEs with ``n_latents`` latents."""
        return self.lr if self.lr is not None else default_lr(n_latents)

    def lr_factor(self, step: int) -> float:
        """Schedule multiplier at ``step``: linear warmup, constant, then linear decay to 0."""
        n = self.n_steps
        warmup = max(1, round(self.warmup_frac * n))
        decay = round(self.decay_frac * n)
        factor = min(1.0, (step + 1) / warmup)
        if decay > 0 and step >= n - decay:
            factor = min(factor, (n - step) / decay)
        return factor

    def sae_keys(self) -> list[tuple[str, int, int]]:
        """``(hook, n_latents, k)`` of every SAE in the run, in a fixed order."""
        return [(h, n, k) for h in self.hooks for n, k in self.settings]

    def validate(self) -> None:
        """Raise UserError for a config that cannot train, before any data is touched."""
        if not self.hooks:
            raise UserError("no hook given; name at least one with --hook, e.g. --hook blocks.6.hook_resid_post")
        if len(set(self.hooks)) != len(self.hooks):
            raise UserError(f"hook listed twice in {self.hooks}; give each --hook once")
        if not self.settings:
            raise UserError("no (n_latents, k) setting given; pass --latents and --k")
        if len(set(self.settings)) != len(self.settings):
            raise UserError(f"setting listed twice in {self.settings}; give each --latents/--k pair once")
        for n, k in self.settings:
            if n <= 0 or k <= 0:
                raise UserError(f"n_latents and k must be positive, got n_latents={n}, k={k}")
            if k >= n:
                raise UserError(f"k={k} must be smaller than n_latents={n}; pick a smaller --k or more --latents")
        positive = ("n_tokens", "batch_size", "log_every", "init_sample_rows", "dead_tokens_threshold",
                    "buffer_rows", "ctx", "model_batch_size", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise UserError(f"checkpoint_every must be 0 (off) or positive, got {self.checkpoint_every}")
        if self.n_tokens < self.batch_size:
            raise UserError(f"n_tokens={self.n_tokens} is less than one batch of {self.batch_size}; raise --tokens or lower --batch-size")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"lr must be a positive number, got {self.lr}")
        for name in ("warmup_frac", "decay_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_frac + self.decay_frac > 1:
            raise UserError("warmup_frac + decay_frac must not exceed 1")
        if not all(0 <= b < 1 for b in self.adam_betas) or self.adam_eps <= 0:
            raise UserError(f"adam_betas must be in [0, 1) and adam_eps positive, got {self.adam_betas}, {self.adam_eps}")
        if self.batch_topk_cap is not None and self.batch_topk_cap < max(k for _, k in self.settings):
            raise UserError(f"batch_topk_cap={self.batch_topk_cap} must be at least every setting's k (settings {self.settings}); "
                            "leave it unset for 4 k, or pass n_latents for the exact rule")
        if self.aux_coef < 0 or (self.k_aux is not None and self.k_aux <= 0):
            raise UserError("aux_coef must be >= 0 and k_aux positive")
        if not (math.isfinite(self.enc_init_scale) and self.enc_init_scale > 0):
            raise UserError(f"enc_init_scale must be > 0, got {self.enc_init_scale}; 1 is the exact transpose init, 0.577 (the default) Gao et al.'s and sparsify's")
        if not 0 < self.threshold_momentum <= 1:
            raise UserError(f"threshold_momentum must be in (0, 1], got {self.threshold_momentum}")
        for name, value, options in (("dist", self.dist, DIST_MODES), ("b_dec_init", self.b_dec_init, B_DEC_INITS)):
            if value not in options:
                raise UserError(f"unknown {name} {value!r}{suggest(value, options)}; choose one of {', '.join(options)}")

    def check_hooks(self, available: list[str]) -> None:
        """Raise UserError if a hook is missing from the data source."""
        for hook in self.hooks:
            if hook not in available:
                raise UserError(f"hook {hook!r} is not in the activations{suggest(hook, available)}; available: {', '.join(available[:8])}")

    def to_dict(self) -> dict:
        """Plain-JSON view of the config."""
        out = dataclasses.asdict(self)
        out["settings"] = [list(s) for s in self.settings]
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build a config from a dict (e.g. a TOML table); unknown keys and wrongly typed values are
        one-line UserErrors naming the key (value ranges are :meth:`validate`'s)."""
        return parse_dataclass(cls, data, where="train", validate=False)

    def fingerprint(self) -> str:
        """Hash of every field that changes what is computed; a checkpoint from another fingerprint is refused."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_HASHED}
        if data.get("enc_init_scale") == 1.0:  # the value before the option existed: those runs keep their fingerprints
            del data["enc_init_scale"]
        if not data.get("cpu_bf16_encoder"):  # likewise for runs from before this option
            data.pop("cpu_bf16_encoder", None)
        data["dead_tokens_threshold"] = self.dead_tokens()  # the window used, however it was given
        if data.get("batch_topk_cap") is None or not self.batch_topk:  # the only behaviour before this option; unused by TopK
            data.pop("batch_topk_cap", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read the ``[train]`` table written by :meth:`to_toml` (or by hand)."""
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise UserError(f"cannot read training config {path}: {err}; fix the file or its path") from err
        if not isinstance(data.get("train"), dict):
            raise UserError(f"{path} has no [train] table; start the file with [train]")
        return cls.from_dict(data["train"])

    def to_toml(self) -> str:
        """The config as a TOML ``[train]`` table (None values are left out: they mean the default)."""
        lines = ["[train]"]
        for key, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"
