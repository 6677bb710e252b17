"""The study config: one dataclass per concern, the same objects drive TOML files and library calls.

A study runs harvest → train SAEs → evaluate → dashboards → probes → steering demo. Every
field has a default, so a config names only what it changes. Ranges are checked in
``validate``; hooks are checked against the model in :func:`check_against_model` before any
stage starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.configparse import parse_dataclass, read_toml
from interp.errors import UserError, suggest

__all__ = [
    "ModelConfig",
    "HarvestConfig",
    "SAESetting",
    "SAEConfig",
    "EvalConfig",
    "DashboardConfig",
    "ProbeConfig",
    "SteerConfig",
    "StudyConfig",
    "load_study",
    "check_against_model",
]

STAGES = ("harvest", "train", "eval", "dashboard", "probes", "steer")


def _positive(where: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UserError(f"{where}.{name} = {value} must be > 0")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """Registry name (see `interp models`), a local HF directory, or a hub name when online."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu' or 'cuda[:N]'."""
    dtype: str = "float32"
    """Model weights dtype: float32 (CPU), or bfloat16/float16 on CUDA."""

    def validate(self, where: str) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"{where}.dtype = {self.dtype!r} is not supported; use float32, bfloat16 or float16")


@dataclass
class HarvestConfig:
    corpus: str = "default"
    """Corpus registry name or a local .txt/.jsonl/.parquet path."""
    hooks: list[str] = field(default_factory=lambda: ["blocks.15.hook_resid_post"])
    """Hooks captured in one forward pass; SAEs are trained on each."""
    n_tokens: int = 200_000
    """Activation rows stored per hook (BOS excluded)."""
    ctx: int = 128
    """Context window length in tokens."""
    batch_size: int = 8
    """Windows per forward pass."""

    def validate(self, where: str) -> None:
        _positive(where, n_tokens=self.n_tokens, ctx=self.ctx, batch_size=self.batch_size)
        if not self.hooks:
            raise UserError(f"{where}.hooks is empty; name at least one hook such as 'blocks.15.hook_resid_post'")


@dataclass
class SAESetting:
    n_latents: int = 4096
    """Dictionary size."""
    k: int = 32
    """Active latents per token (TopK)."""

    def validate(self, where: str) -> None:
        _positive(where, n_latents=self.n_latents, k=self.k)
        if self.k >= self.n_latents:
            raise UserError(f"{where}: k = {self.k} must be smaller than n_latents = {self.n_latents}")


@dataclass
class SAEConfig:
    settings: list[SAESetting] = field(default_factory=lambda: [SAESetting()])
    """(n_latents, k) pairs; every setting is trained on every harvested hook in one pass."""
    n_tokens: int = 400_000
    """Training tokens (more than the store holds → further reshuffled epochs)."""
    batch_size: int = 4096
    """Rows per optimizer step."""
    lr: float = 0.0
    """Adam learning rate; 0 picks 2e-4 / sqrt(n_latents / 2**14)."""
    batch_topk: bool = False
    """Train BatchTopK instead of per-token TopK."""
    auxk: bool = True
    """AuxK loss on dead latents."""
    enc_init_scale: float = 3 ** -0.5  # saes.step.DEFAULT_ENC_INIT_SCALE (not imported: config parsing stays torch-free)
    """Encoder init W_enc = enc_init_scale * W_dec^T (default 1/sqrt(3): Gao et al.'s reference code and eai-sparsify; 1: exact transpose)."""
    cpu_bf16_encoder: bool = False
    """CPU: encoder GEMM in bf16 (as on CUDA); fast on CPUs with AMX-BF16, slow elsewhere."""
    checkpoint_every: int = 200
    """Steps between atomic checkpoints."""

    def validate(self, where: str) -> None:
        _positive(where, n_tokens=self.n_tokens, batch_size=self.batch_size, checkpoint_every=self.checkpoint_every)
        if self.lr < 0:
            raise UserError(f"{where}.lr = {self.lr} must be >= 0 (0 = default rule)")
        if not (math.isfinite(self.enc_init_scale) and self.enc_init_scale > 0):
            raise UserError(f"{where}.enc_init_scale = {self.enc_init_scale} must be > 0 (1 = transpose init)")
        if not self.settings:
            raise UserError(f"{where}.settings is empty; add e.g. {{ n_latents = 4096, k = 32 }}")


@dataclass
class EvalConfig:
    n_tokens: int = 16_384
    """Tokens for the SAE metrics (L0, FVU, CE-loss recovered, KL)."""

    def validate(self, where: str) -> None:
        _positive(where, n_tokens=self.n_tokens)


@dataclass
class DashboardConfig:
    enabled: bool = True
    """Write the feature dashboard HTML."""
    n_features: int = 32
    """Features shown (the most frequently firing live ones, plus the steering feature)."""
    n_tokens: int = 32_768
    """Tokens streamed for feature statistics and max-activating contexts."""

    def validate(self, where: str) -> None:
        _positive(where, n_features=self.n_features, n_tokens=self.n_tokens)


@dataclass
class ProbeConfig:
    enabled: bool = True
    """Run the probing stage."""
    tasks: list[str] = field(default_factory=lambda: ["sentiment"])
    """Shipped task names or CSV/JSONL paths."""
    layers: str = "all"
    """'all' or a comma list such as '0,5,10'."""
    pooling: str = "last"
    """'last' or 'mean'."""

    def validate(self, where: str) -> None:
        if self.pooling not in ("last", "mean"):
            raise UserError(f"{where}.pooling = {self.pooling!r}; use 'last' or 'mean'")


@dataclass
class SteerConfig:
    enabled: bool = True
    """Run the steering demonstration."""
    query: str = "Bible"
    """Concept searched among the SAE features (feature search); the best feature is clamped."""
    keywords: list[str] = field(default_factory=list)
    """Words that count as a concept hit (default: the query's words)."""
    clamp: str = "10x"
    """Clamp value: a number or 'Nx' (N × the feature's max activation)."""
    n_prompts: int = 8
    """Neutral prompts used (from the shipped list)."""
    max_new_tokens: int = 24
    """Tokens generated per prompt."""
    rerank: bool = True
    """Rerank the search's top candidates by measured steering effect on the selection prompts (saes.select_steering_feature)."""
    n_candidates: int = 20
    """Search candidates that the rerank measures."""
    positions: str = "generated"
    """Where the clamp acts: 'generated' (new tokens only) or 'all' (prompt too)."""

    def validate(self, where: str) -> None:
        _positive(where, n_prompts=self.n_prompts, max_new_tokens=self.max_new_tokens, n_candidates=self.n_candidates)
        if self.positions not in ("generated", "all"):
            raise UserError(f"{where}.positions = {self.positions!r} is not supported; use 'generated' or 'all'")


@dataclass
class StudyConfig:
    name: str = "study"
    """Study name (used in the report)."""
    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    out: str = ""
    """Run directory; empty → runs/<name>."""
    model: ModelConfig = field(default_factory=ModelConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}")


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read and validate a study TOML file (plus optional top-level overrides such as ``out``)."""
    data = read_toml(path)
    data.update(overrides or {})
    return parse_dataclass(StudyConfig, data, "config")


def check_against_model(cfg: StudyConfig, model: Any) -> None:
    """Refuse hooks the model lacks and layer lists out of range, before any work starts."""
    names = set(model.hook_dict)
    for hook in cfg.harvest.hooks:
        if hook not in names:
            raise UserError(f"config.harvest.hooks: the model has no hook {hook!r}{suggest(hook, names)}")
    if cfg.probes.enabled and cfg.probes.layers != "all":
        n_layers = model.cfg.n_layers
        try:
            layers = [int(x) for x in cfg.probes.layers.split(",")]
        except ValueError:
            raise UserError(f"config.probes.layers = {cfg.probes.layers!r}; use 'all' or integers like '0,5,10'") from None
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise UserError(f"config.probes.layers: {bad} out of range; the model has layers 0..{n_layers - 1}")
