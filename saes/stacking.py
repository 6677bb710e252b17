"""Between the trainer and :mod:`saes.step`: build a stack from per-SAE inits, flatten it for checkpoints.

A stack's member ``i`` is initialised on its own (``init_stack`` with ``S = 1`` and the member's seed)
and the members are concatenated, so an SAE's starting weights do not depend on which other SAEs
share its stack: training several SAEs together gives what training each alone gives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.errors import UserError
from saes.step import DEFAULT_ENC_INIT_SCALE, StackParams, StepConfig, StepState, init_stack, init_state

__all__ = ["build_stack", "make_step_config", "stack_tensors", "load_stack_tensors"]


def build_stack(d_in: int, n_latents: int, samples: list[Float[Tensor, "N d_in"]], seeds: list[int], b_dec_init: str,
                device: torch.device, enc_init_scale: float = DEFAULT_ENC_INIT_SCALE) -> tuple[StackParams, StepState]:
    """A ``StackParams`` of ``len(samples)`` members (member i from ``samples[i]`` and ``seeds[i]``) and its fresh state."""
    singles = [init_stack(1, d_in, n_latents, sample[None], b_dec_init=b_dec_init, seed=seed, enc_init_scale=enc_init_scale)
               for sample, seed in zip(samples, seeds)]
    params = StackParams(len(singles), d_in, n_latents, device=device)
    with torch.no_grad():
        for name, value in params.named_parameters():
            value.copy_(torch.cat([getattr(s, name) for s in singles]))
    return params, init_state(len(singles), n_latents, device)


def make_step_config(cfg: Any, k: int) -> StepConfig:
    """The :class:`StepConfig` for SAEs with TopK ``k`` under training config ``cfg``."""
    wanted = {"k": k, "batch_topk": cfg.batch_topk, "auxk": cfg.auxk, "k_aux": cfg.k_aux, "aux_coef": cfg.aux_coef,
              "dead_tokens_threshold": cfg.dead_tokens(), "threshold_momentum": cfg.threshold_momentum,
              "cpu_bf16_encoder": cfg.cpu_bf16_encoder, "max_k_per_token": cfg.batch_topk_cap}
    names = {f.name for f in dataclasses.fields(StepConfig)}
    return StepConfig(**{key: value for key, value in wanted.items() if key in names})


def stack_tensors(stacks: list[Any]) -> tuple[dict[str, Tensor], dict]:
    """Every stack's parameters and step state as flat tensors plus JSON metadata (for a checkpoint)."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"stacks": []}
    for j, stack in enumerate(stacks):
        for name, value in stack.params.state_dict().items():
            tensors[f"stack{j}.param.{name}"] = value
        plain = {}
        for field in dataclasses.fields(stack.state):
            value = getattr(stack.state, field.name)
            if isinstance(value, Tensor):
                tensors[f"stack{j}.state.{field.name}"] = value
            else:
                plain[field.name] = value
        meta["stacks"].append({"keys": [list(key) for key in stack.keys], "state": plain})
    return tensors, meta


def load_stack_tensors(stacks: list[Any], tensors: dict[str, Tensor], meta: dict) -> None:
    """Restore parameters and step state written by :func:`stack_tensors` into matching stacks (bit-exact)."""
    saved = [[tuple(key) for key in s["keys"]] for s in meta["stacks"]]
    if saved != [list(stack.keys) for stack in stacks]:
        raise UserError("the checkpoint holds different SAEs than this run trains; resume with the same hooks, settings and --dist, or pass --no-resume")
    for j, stack in enumerate(stacks):
        device = next(stack.params.parameters()).device
        with torch.no_grad():
            for name, value in stack.params.state_dict().items():
                if f"stack{j}.param.{name}" not in tensors:
                    raise UserError(f"the checkpoint has no {name} (written by an older version of the trainer); pass --no-resume to start over")
                saved_value = tensors[f"stack{j}.param.{name}"]
                if saved_value.shape != value.shape:
                    raise UserError(f"the checkpoint's {name} has shape {tuple(saved_value.shape)} but this run needs {tuple(value.shape)} "
                                    "(the activations' d_in changed?); resume on the same activations or pass --no-resume")
                value.copy_(saved_value)
        fields = dict(meta["stacks"][j]["state"])
        for field in dataclasses.fields(stack.state):
            key = f"stack{j}.state.{field.name}"
            if key in tensors:
                fields[field.name] = tensors[key].to(device)
        stack.state = type(stack.state)(**fields)
