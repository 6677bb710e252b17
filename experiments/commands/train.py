"""``interp train-sae``: train TopK SAEs on stored activations (or a live model), many at once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import typer

from experiments.app import command, console
from interp.errors import UserError

__all__ = ["train_sae"]


@command("train-sae")
def train_sae(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Run directory: one SAE directory per (hook, setting), metrics.jsonl, checkpoints."),
    hook: list[str] = typer.Option([], "--hook", help="Hook to train on; repeat for several hooks."),
    config: Path | None = typer.Option(None, "--config", help="Start from a [train] TOML table (e.g. a run's config.toml); flags given on the command line override its values."),
    latents: list[int] = typer.Option([4096], "--latents", help="Number of latents; repeat, paired in order with --k."),
    k: list[int] = typer.Option([32], "--k", help="Active latents per token; one per --latents."),
    acts: Path | None = typer.Option(None, "--acts", help="Activation store directory (from `interp harvest`)."),
    model: str | None = typer.Option(None, "--model", help="Train straight from this model instead of --acts (harvest on the fly, nothing on disk)."),
    corpus: str = typer.Option("default", "--corpus", help="Corpus for --model runs."),
    tokens: int = typer.Option(10_000_000, "--tokens", help="Training tokens per SAE; more than the store holds rolls into new epochs."),
    batch_size: int = typer.Option(4096, "--batch-size", help="Rows per step (global, split over ranks with --dist ddp)."),
    lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (default 2e-4 / sqrt(n_latents / 2^14))."),
    dist: str = typer.Option("none", "--dist", help="Under torchrun: ddp (data-parallel) or shard (SAEs spread over ranks)."),
    checkpoint_every: int = typer.Option(1000, "--checkpoint-every", help="Steps between checkpoints (0: none)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest checkpoint in --out."),
    batch_topk: bool = typer.Option(False, "--batch-topk/--topk", help="Train BatchTopK SAEs (global inference threshold)."),
    batch_topk_cap: int | None = typer.Option(None, "--batch-topk-cap", help="BatchTopK: most latents one token may take (default 4k; n_latents: the exact rule)."),
    auxk: bool = typer.Option(True, "--auxk/--no-auxk", help="AuxK loss on dead latents."),
    k_aux: int | None = typer.Option(None, "--k-aux", help="Dead latents AuxK uses per token (default d_in / 2)."),
    aux_coef: float = typer.Option(1 / 32, "--aux-coef", help="Weight of the AuxK loss."),
    b_dec_init: str = typer.Option("geometric_median", "--b-dec-init", help="Decoder bias init from a sample: geometric_median or mean."),
    threshold_momentum: float = typer.Option(0.01, "--threshold-momentum", help="BatchTopK: weight of the newest batch in the running inference threshold."),
    dead_tokens: int | None = typer.Option(None, "--dead-tokens", help="A latent that has not fired for this many tokens is dead (AuxK, dead_fraction); default a tenth of --tokens, at most 10M."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and row order."),
    enc_init_scale: float = typer.Option(3 ** -0.5, "--enc-init-scale", help="Encoder init W_enc = s * W_dec^T (default 1/sqrt(3): Gao et al.'s reference code and sparsify; 1: exact transpose)."),
    cpu_bf16_encoder: bool = typer.Option(False, "--cpu-bf16-encoder", help="CPU: encoder GEMM in bf16 (as on CUDA); fast on CPUs with AMX-BF16 (Xeon Sapphire Rapids and later), slow elsewhere."),
    device: str | None = typer.Option(None, "--device", help="Torch device (default: CUDA if available, else CPU)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a local/hub model to run its own Python code (off by default; only for models you trust)."),
    log_every: int = typer.Option(10, "--log-every", help="Steps between metrics.jsonl rows."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train TopK SAEs on every --hook for every --latents/--k pair in one pass over the data."""
    from saes.config import TrainConfig
    from saes.trainer import train

    def typed_in(param: str) -> bool:  # typer may vendor click: compare the source by name
        source = ctx.get_parameter_source(param)
        return source is not None and source.name == "COMMANDLINE"

    base = TrainConfig.from_toml(config) if config is not None else None
    if base is not None and typed_in("latents") != typed_in("k"):
        # one half of the pairs typed: the other half comes from the file, setting by setting
        flag, given = ("--latents", latents) if typed_in("latents") else ("--k", k)
        if len(given) != len(base.settings):
            raise UserError(f"{config} has {len(base.settings)} settings but {len(given)} {flag} were given; pass both --latents and --k")
        file_latents, file_k = ([setting[i] for setting in base.settings] for i in (0, 1))
        latents, k = (latents, file_k) if flag == "--latents" else (file_latents, k)
    if len(latents) != len(k):
        raise UserError(f"got {len(latents)} --latents but {len(k)} --k; give one --k for each --latents, in the same order")
    if (acts is None) == (model is None):
        raise UserError("pass exactly one data source: --acts DIR (stored activations) or --model NAME (live)")
    # every TrainConfig field the CLI sets, with the CLI parameters it comes from
    values = {"hooks": hook, "settings": list(zip(latents, k)), "n_tokens": tokens, "batch_size": batch_size, "lr": lr, "dist": dist,
              "checkpoint_every": checkpoint_every, "batch_topk": batch_topk, "batch_topk_cap": batch_topk_cap, "auxk": auxk, "k_aux": k_aux, "aux_coef": aux_coef,
              "b_dec_init": b_dec_init, "threshold_momentum": threshold_momentum, "dead_tokens_threshold": dead_tokens, "seed": seed,
              "enc_init_scale": enc_init_scale, "cpu_bf16_encoder": cpu_bf16_encoder, "device": device, "log_every": log_every,
              "corpus": corpus, "progress": progress}
    params = {"hooks": ("hook",), "settings": ("latents", "k"), "n_tokens": ("tokens",), "dead_tokens_threshold": ("dead_tokens",)}
    if base is None:
        cfg = TrainConfig(**values)
    else:
        typed = {name: value for name, value in values.items() if any(typed_in(p) for p in params.get(name, (name,)))}
        cfg = dataclasses.replace(base, **typed)
    cfg.validate()
    if acts is not None:
        if not acts.is_dir():
            raise UserError(f"activation store {acts} does not exist; run `interp harvest` first or fix --acts")
        source: object = str(acts)
    else:
        from interp.models import load_model
        from saes.distributed import device_for

        # the model harvests on this rank's device (under torchrun its own GPU, not every rank's cuda:0)
        source = load_model(model, device=device_for(cfg.dist, cfg.device), trust_remote_code=trust_remote_code)
    saes = train(source, cfg, out, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        for name in saes:
            console.print(f"wrote {out / name}")
