"""The SAE training loop: data, schedule, logging, checkpoints and the final SAE files.

Every (hook, ``(n_latents, k)``) pair of a :class:`TrainConfig` is one SAE. SAEs of the same shape
``(d_in, n_latents, k)`` are trained as one stack (:mod:`saes.step`), so a step is a few batched ops
per shape, not a loop over SAEs; all stacks share one stream of rows. Inputs are scaled per hook so
that ``E||c x||^2 = d_in`` (``c`` estimated from a sample) and ``c`` is folded into the saved files.
Each member is initialised from its own seed, so an SAE trained in a stack starts exactly where it
would start if trained alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.errors import UserError
from interp.faults import fault
from interp.files import atomic_write_text
from saes import checkpoint as ckpt
from saes.config import DEFAULT_DEAD_TOKENS, TrainConfig, sae_name
from saes.distributed import (
    DistContext, all_gather_objects, all_reduce_grads, any_over_ranks, errors_together, gather_objects, mean_over_ranks, setup, sum_over_ranks,
    sync_step_state, total_variance_over_ranks,
)
from saes.model import TopKSAE
from saes.stacking import build_stack, load_stack_tensors, make_step_config, stack_tensors
from saes.step import NON_FINITE_BATCH, constrain_decoder_grad, input_scale, is_finite, normalize_decoder, sae_step_loss
from saes.streams import open_stream
from saes.training_log import MetricsLog, progress_bar

__all__ = ["train"]

StepHook = Callable[[int, dict], None]
_SUMMED = frozenset({"fvu", "auxk_loss"})
"""ddp metrics that are sums over ranks (the rest are means over equal-size slices)."""


class _HeldInterrupt:
    """Holds a Ctrl-C (SIGINT) that arrives inside the block and raises it as the block ends, so an
    interrupted step finishes and can be checkpointed; a second Ctrl-C interrupts at once. Only in the
    main thread and while Python's own SIGINT handler is installed (elsewhere: no effect)."""

    def __enter__(self) -> _HeldInterrupt:
        self.pending = False
        self.installed = (threading.current_thread() is threading.main_thread()
                          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self.installed:
            signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.pending and exc_type is None:
            raise KeyboardInterrupt


@dataclass
class _Stack:
    """SAEs of one shape trained together."""

    keys: list[tuple[str, int, int]]
    """``(hook, n_latents, k)`` of each member, in stack order."""
    params: Any
    """The stacked parameters (``saes.step.StackParams``)."""
    state: Any
    """The explicit step state (``saes.step.StepState``)."""
    step_cfg: Any
    """The step configuration (``saes.step.StepConfig``)."""
    lr: float
    """Peak learning rate."""


def member_seed(seed: int, hook: str, n_latents: int, k: int) -> int:
    """Initialisation seed of one SAE: depends on the run seed and the SAE, not on what it is stacked with."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{hook}:{n_latents}:{k}".encode()).digest()[:4], "little")


def train(source: Any, cfg: TrainConfig, out: str | Path, *, corpus: str | Tensor | None = None,
          resume: bool = True, on_step: StepHook | None = None) -> dict[str, TopKSAE]:
    """Train every SAE of ``cfg`` on ``source`` (ActivationStore, store dir or live model); write them under ``out``.

    Returns ``{sae_name: TopKSAE}`` for the SAEs this process trained (all of them unless
    ``cfg.dist == 'shard'``). ``on_step(steps_done, {"data_batch": ...})`` runs after every step
    (tests stop a run from it). With ``resume`` a run continues from the newest valid checkpoint in ``out``.
    """
    cfg.validate()
    ctx = setup(cfg.dist, cfg.device)
    try:
        with errors_together(ctx):  # a bad sample on one rank's hooks stops them all
            run = _Run(source, cfg, Path(out), ctx, corpus, on_step)
        return run.run(resume)
    finally:
        ctx.close()


class _Run:
    """One training run: built from the config, then :meth:`run` steps it to the end."""

    def __init__(self, source: Any, cfg: TrainConfig, out: Path, ctx: DistContext, corpus: Any, on_step: StepHook | None):
        self.cfg, self.out, self.ctx, self.on_step = cfg, out, ctx, on_step
        self.data_world = ctx.world if ctx.mode == "ddp" else 1
        if cfg.batch_size % self.data_world:
            raise UserError(f"batch_size {cfg.batch_size} does not split evenly over {ctx.world} ranks; pick a multiple of {ctx.world}")
        self.stream = open_stream(source, cfg.hooks, cfg.batch_size, cfg.seed, cfg.buffer_rows, corpus=corpus if corpus is not None else cfg.corpus,
                                  ctx=cfg.ctx, model_batch_size=cfg.model_batch_size, n_tokens=cfg.n_tokens,
                                  progress=cfg.progress and ctx.is_main)
        cfg.check_hooks(self.stream.available_hooks)
        keys = cfg.sae_keys()
        if ctx.mode == "shard":
            if len(keys) < ctx.world:
                raise UserError(f"--dist shard needs at least one SAE per rank: {len(keys)} SAEs for {ctx.world} ranks; use fewer ranks or --dist ddp")
            keys = keys[ctx.rank::ctx.world]
        self.hooks = [h for h in cfg.hooks if any(key[0] == h for key in keys)]
        self.scales: dict[str, float] = {}
        samples: dict[str, Tensor] = {}
        for hook in self.hooks:
            sample = self.stream.sample(hook, cfg.init_sample_rows)
            self.scales[hook] = float(input_scale(sample[None])[0])
            samples[hook] = sample * self.scales[hook]
        self.stacks = self._build(keys, samples)
        self.optimizer = torch.optim.Adam([{"params": list(s.params.parameters()), "lr": s.lr} for s in self.stacks],
                                          betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True)  # fused: ~4x faster step on CPU

    def _build(self, keys: list[tuple[str, int, int]], samples: dict[str, Tensor]) -> list[_Stack]:
        """Group SAEs by shape into stacks, each member initialised from :func:`member_seed`."""
        groups: dict[tuple[int, int, int], list[tuple[str, int, int]]] = {}
        for hook, n, k in keys:
            groups.setdefault((samples[hook].shape[-1], n, k), []).append((hook, n, k))
        stacks = []
        for (d_in, n, k), members in groups.items():
            params, state = build_stack(d_in, n, [samples[h] for h, _, _ in members],
                                        [member_seed(self.cfg.seed, *m) for m in members], self.cfg.b_dec_init, self.ctx.device,
                                        self.cfg.enc_init_scale)
            stacks.append(_Stack(members, params, state, make_step_config(self.cfg, k), self.cfg.lr_for(n)))
        return stacks

    # -- checkpoints -----------------------------------------------------------------------------

    def _state_rank(self) -> int:
        """Which rank's checkpoint file holds this rank's state (ddp ranks are identical: rank 0's)."""
        return self.ctx.rank if self.ctx.mode == "shard" else 0

    def _diverged(self) -> str | None:
        """The name of an SAE with a NaN/Inf weight, else None (a checkpoint of it would replace good ones).
        Collective under ``--dist shard`` (each rank holds other SAEs): every rank gets the same answer."""
        found = None
        for stack in self.stacks:
            bad = torch.zeros(len(stack.keys), dtype=torch.bool, device=self.ctx.device)
            for p in stack.params.parameters():
                bad |= ~torch.isfinite(p.detach()).flatten(1).all(1)
            if found is None and bool(bad.any()):
                found = sae_name(*stack.keys[int(bad.nonzero()[0])])
        if self.ctx.mode == "shard" and self.ctx.active:
            anywhere = sum_over_ranks(torch.tensor([float(found is not None)], device=self.ctx.device), self.ctx.world)
            if found is None and float(anywhere[0]) > 0:
                found = "an SAE on another rank"
        return found

    def _save_checkpoint(self, step: int, data_batch: int) -> None:
        """Atomically checkpoint everything a bit-exact resume needs; refuse weights that are no longer finite."""
        if (bad := self._diverged()) is not None:
            raise UserError(f"training diverged by step {step}: {bad} has NaN/Inf weights, so no checkpoint was written over the good ones; "
                            "lower --lr or check the activations, then resume from the last checkpoint or pass --no-resume")
        owns = self.ctx.mode == "shard" or self.ctx.is_main
        part = None
        if owns:
            tensors, meta = stack_tensors(self.stacks)
            adam, adam_meta = ckpt.optimizer_to_flat(self.optimizer)
            tensors.update(adam)
            tensors["rng.torch"] = torch.get_rng_state()
            meta.update(adam_meta, scales=self.scales)
            part = ckpt.write_state(self.out, step, self.ctx.rank, tensors, meta)
            fault("checkpoint.before_commit")
        parts = [p for p in gather_objects(part, self.ctx) if p is not None]
        if self.ctx.is_main:
            ckpt.commit(self.out, step, self.cfg.fingerprint(), {"data_batch": data_batch, "world": self.ctx.world,
                                                                  "data": self.stream.identity()}, parts)
            ckpt.prune(self.out, self.cfg.keep_checkpoints)
        self.ctx.barrier()

    def _explain_old_init(self) -> None:
        """A clearer error when the checkpoints differ only by a default that changed since they were written."""
        changed = [("enc_init_scale", 1.0, "--enc-init-scale 1", "enc_init_scale 1 (the default before it became 1/sqrt(3))"),
                   ("dead_tokens_threshold", DEFAULT_DEAD_TOKENS, f"--dead-tokens {DEFAULT_DEAD_TOKENS}",
                    f"a dead-latent window of {DEFAULT_DEAD_TOKENS:,} tokens (the default before it became a tenth of the run)")]
        tried = [[c] for c in changed] + [changed]  # each old default alone, then both together
        for combo in tried:
            if any(getattr(self.cfg, name) == old for name, old, _, _ in combo):
                continue
            try:
                ckpt.latest(self.out, dataclasses.replace(self.cfg, **{name: old for name, old, _, _ in combo}).fingerprint())
            except UserError:
                continue
            raise UserError(f"the checkpoints in {self.out} were written with {' and '.join(what for *_, what in combo)}; "
                            f"pass {' '.join(flag for _, _, flag, _ in combo)} to resume them, or --no-resume to start over")

    def _resume(self) -> tuple[int, int]:
        """Load the newest valid checkpoint; return ``(steps done, data batch index)``."""
        try:
            found = ckpt.latest(self.out, self.cfg.fingerprint())
        except UserError:
            self._explain_old_init()
            raise
        if found is None:
            return 0, 0
        if self.ctx.mode == "shard" and found.meta.get("world", self.ctx.world) != self.ctx.world:
            # each shard rank's file holds its own share of the SAEs: another world size deals them out differently
            raise UserError(f"the checkpoints in {self.out} were written by {found.meta['world']} shard ranks, this run has {self.ctx.world}; "
                            f"resume with torchrun --nproc_per_node {found.meta['world']}, or pass --no-resume to start over")
        recorded, now = found.meta.get("data"), self.stream.identity()
        if recorded is not None and recorded != now:  # checkpoints from before this record carry none
            def describe(data: dict) -> str:
                return ", ".join(f"{key} {value}" for key, value in sorted(data.items()))

            raise UserError(f"the checkpoints in {self.out} were trained on other data ({describe(recorded)}; now {describe(now)}); "
                            "train from the same activations to resume, or pass --no-resume to start over")
        tensors, meta = found.load_rank(self._state_rank())
        load_stack_tensors(self.stacks, tensors, meta)
        ckpt.optimizer_from_flat(self.optimizer, tensors, meta)
        torch.set_rng_state(tensors["rng.torch"])
        self.scales = {h: float(meta["scales"][h]) for h in self.hooks}
        return found.step, int(found.meta["data_batch"])

    # -- the loop ----------------------------------------------------------------------------------

    def _step(self, batch: dict[str, Tensor], step: int) -> list[dict[str, Tensor]]:
        """One optimizer step on every stack; returns each stack's metrics ``{name: [S]}``."""
        cfg, device = self.cfg, self.ctx.device
        if device.type == "cuda" or self.ctx.active:
            # the CUDA step skips this check (a host sync): check the host batch before it moves. Under
            # torchrun every rank must stop together (a rank's own slice or hooks may be the only bad ones)
            bad = not all(is_finite(batch[h]) for h in self.hooks)
            if any_over_ranks(bad, self.ctx):
                raise UserError(NON_FINITE_BATCH)
        x_by_hook = {h: batch[h].to(device, non_blocking=True).float() * self.scales[h] for h in self.hooks}
        ddp = self.ctx.mode == "ddp"
        xs = []
        for stack in self.stacks:
            hooks = [h for h, _, _ in stack.keys]
            same = len(set(hooks)) == 1
            xs.append(x_by_hook[hooks[0]][None].expand(len(hooks), -1, -1) if same else torch.stack([x_by_hook[h] for h in hooks]))
        # ddp: every rank divides by the global batch's variance, so the global loss (and its
        # gradient) is the sum over ranks of the rank losses, exactly as one process would compute it
        variances = total_variance_over_ranks(xs, self.ctx.world) if ddp else [None] * len(xs)
        results, total = [], None
        for stack, x, variance in zip(self.stacks, xs, variances):
            # precision is the step's: bf16 encoder GEMM (TF32 elsewhere) on CUDA, fp32 on CPU
            loss, metrics, new_state = sae_step_loss(stack.params, stack.state, x, stack.step_cfg, total_variance=variance,
                                                     world=self.data_world)
            total = loss if total is None else total + loss
            results.append((metrics, new_state))
        total.backward()
        fault("train.mid_step")
        if ddp:
            all_reduce_grads([p for s in self.stacks for p in s.params.parameters()], self.ctx.world)
        for stack, group in zip(self.stacks, self.optimizer.param_groups):
            constrain_decoder_grad(stack.params)
            group["lr"] = stack.lr * cfg.lr_factor(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = []
        for stack, (metrics, new_state) in zip(self.stacks, results):
            normalize_decoder(stack.params)
            if ddp:
                new_state = sync_step_state(stack.state, new_state, cfg.batch_size // self.data_world, self.ctx.world)
                # the rank's own count only saw its slice; the synced state is the global batch's
                metrics["dead_fraction"] = (new_state.tokens_since_fired >= stack.step_cfg.dead_tokens_threshold).float().mean(1)
            stack.state = new_state
            out.append(metrics)
        return out

    def _rows(self, metrics: list[dict[str, Tensor]], step: int, lr_factor: float, samples_per_s: float, epoch: int) -> list[dict]:
        """metrics.jsonl rows, one per SAE, for the step just done."""
        rows = []
        for stack, m in zip(self.stacks, metrics):
            if self.ctx.mode == "ddp":
                # fvu and auxk_loss are already divided by the global variance: they add up over ranks
                m = {name: (sum_over_ranks if name in _SUMMED else mean_over_ranks)(v, self.ctx.world) for name, v in m.items()}
            values = {name: v.detach().float().cpu().tolist() for name, v in m.items()}
            for i, (hook, n, k) in enumerate(stack.keys):
                row = {"step": step, "sae": sae_name(hook, n, k), "hook": hook, "n_latents": n, "k": k,
                       "tokens": step * self.cfg.batch_size, "epoch": epoch}
                row.update({name: vals[i] for name, vals in values.items()})
                row.update(lr=stack.lr * lr_factor, samples_per_s=samples_per_s)
                rows.append(row)
        return rows

    @staticmethod
    def _check_rows(rows: list[dict], step: int) -> None:
        """A one-line error when an SAE's FVU is no longer finite (every rank checks the same rows)."""
        for row in rows:
            if not math.isfinite(row.get("fvu", 0.0)):
                raise UserError(f"training diverged at step {step} for {row['sae']} (FVU is {row['fvu']}); lower --lr or check the activations for NaN/Inf")

    def run(self, resume: bool) -> dict[str, TopKSAE]:
        """Step from the last checkpoint (or 0) to ``cfg.n_steps``, then write one SAE directory per member."""
        cfg, ctx = self.cfg, self.ctx
        if not resume and ctx.is_main:
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
        ctx.barrier()
        with errors_together(ctx):
            start, data_batch = self._resume() if resume else (0, 0)
        log = MetricsLog(self.out / "metrics.jsonl", keep_until=start, enabled=ctx.is_main)
        if ctx.is_main:
            atomic_write_text(self.out / "config.toml", cfg.to_toml())
        n_rows = self.stream.n_rows
        last_ckpt, tick, tick_step = start, time.perf_counter(), start
        with progress_bar(cfg.n_steps, start, enabled=cfg.progress and ctx.is_main) as bar:
            batches = self.stream.batches(data_batch, ctx.rank if ctx.mode == "ddp" else 0, self.data_world)
            step, dirty = start, False
            try:
                while step < cfg.n_steps:
                    next_batch, batch = next(batches)
                    dirty = True  # params may be half-updated until the step is counted
                    with _HeldInterrupt():  # a Ctrl-C lands after the step, which is then checkpointed
                        metrics = self._step(batch, step)
                        step, data_batch = step + 1, next_batch
                        dirty = False
                    if step % cfg.log_every == 0 or step == cfg.n_steps:
                        now = time.perf_counter()
                        speed = (step - tick_step) * cfg.batch_size / max(now - tick, 1e-9)
                        tick, tick_step = now, step
                        epoch = (data_batch * cfg.batch_size - 1) // n_rows if n_rows else 0
                        rows = self._rows(metrics, step, cfg.lr_factor(step - 1), speed, epoch)
                        # shard: every rank gets every rank's rows, so a divergence anywhere stops all ranks alike
                        rows = [r for part in all_gather_objects(rows, ctx) for r in part] if ctx.mode == "shard" else rows
                        self._check_rows(rows, step)
                        log.write(rows, bar)
                    if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.n_steps):
                        self._save_checkpoint(step, data_batch)
                        last_ckpt = step
                    bar.advance()
                    fault("train.step")
                    if self.on_step is not None:
                        self.on_step(step, {"data_batch": data_batch})
            except KeyboardInterrupt:
                if cfg.checkpoint_every and step > last_ckpt and not dirty and not ctx.active and self._diverged() is None:
                    self._save_checkpoint(step, data_batch)
                raise
        return self._save_saes()

    def _save_saes(self) -> dict[str, TopKSAE]:
        """Write one SAE directory per member (ddp: rank 0 writes; shard: each rank its own)."""
        saes: dict[str, TopKSAE] = {}
        for stack in self.stacks:
            for i, (hook, n, k) in enumerate(stack.keys):
                threshold = float(stack.state.threshold[i]) if self.cfg.batch_topk else None
                sae = TopKSAE.from_stack(stack.params, i, k, activation_scale=self.scales[hook], threshold=threshold,
                                         hook_name=hook, model=self.stream.model_name)
                sae.extra = {"training_tokens": self.cfg.n_steps * self.cfg.batch_size, "seed": self.cfg.seed,
                             "config": self.cfg.to_dict()}
                name = sae_name(hook, n, k)
                if self.ctx.mode == "shard" or self.ctx.is_main:
                    sae.save(self.out / name)
                    fault("train.sae_saved")
                saes[name] = sae
        self.ctx.barrier()
        return saes
