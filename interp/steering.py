"""Steering interventions on the residual stream and the context manager that applies them.

Every intervention maps an activation ``x [batch, pos, d_model]`` at one hook to ``x'`` on the
positions its policy selects (see :mod:`interp.steering_positions`); other positions and padding
are returned untouched. SAE interventions work on any :class:`interp.FeatureDictionary` and keep
the SAE's reconstruction error: with ``f = encode(x)`` taken after TopK,

    x' = x + Σᵢ (vᵢ − fᵢ) · W_dec[i]        (Templeton et al. 2024, "Scaling Monosemanticity")

so ``x' − decode(f') == x − decode(f)`` where ``f'`` is ``f`` with the clamped values written in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.dictionary import FeatureDictionary
from interp.directions import Direction
from interp.errors import UserError, suggest
from interp.models import model_device
from interp.steering_positions import Positions, PositionTracker, as_positions

__all__ = ["Intervention", "Clamp", "Scale", "Ablate", "Add", "steered", "contrastive_vector", "mean_residual_norm", "prompt_lengths"]

_ACTIVE: dict[int, list[PositionTracker]] = {}
_NORM_CACHE: dict[tuple[int, str, tuple[str, ...]], float] = {}


def _multiple(value: Any) -> float | None:
    """``"10x"`` -> 10.0; plain numbers (or numeric strings) -> None, since they are absolute."""
    if isinstance(value, str) and value.strip().lower().endswith("x"):
        try:
            return float(value.strip()[:-1])
        except ValueError:
            pass
        raise UserError(f"cannot read the strength {value!r}; give a number like 3.5 or a multiple like '10x'")
    _number(value)
    return None


def _number(value: Any) -> float:
    """A plain number; strings like '3.5' are accepted, multiples like '10x' are not."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"cannot read the number {value!r}; give a value like 3.5") from None


class Intervention:
    """Base class: a map ``x -> x'`` at ``hook`` on the positions chosen by ``positions``."""

    hook: str
    positions: Positions

    def prepare(self, model: Any) -> None:
        """Resolve model-dependent settings (relative strengths, devices) before hooks are added."""

    def apply(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        """The steered activation at every position (the hook keeps it only where selected)."""
        raise NotImplementedError


class _FeatureIntervention(Intervention):
    """Shared code of Clamp, Scale and SAE-feature Ablate: x' = x + Σᵢ (targetᵢ − fᵢ) W_dec[i]."""

    def __init__(self, sae: FeatureDictionary, features: int | Sequence[int], hook: str | None, positions: Positions | str | None):
        self.sae = sae
        self.hook = hook or getattr(sae, "hook_name", "")
        if not self.hook:
            raise UserError("the SAE has no hook_name; pass hook='blocks.N.hook_resid_post'")
        try:
            feats = [int(f) for f in torch.as_tensor(features).reshape(-1).tolist()]
        except (TypeError, ValueError, RuntimeError):
            raise UserError(f"features must be integer ids, not {features!r}") from None
        n_latents = sae.W_dec.shape[0]
        bad = [f for f in feats if not 0 <= f < n_latents]
        if not feats or bad:
            raise UserError(f"feature ids {bad or feats} are out of range; this SAE has features 0..{n_latents - 1}")
        self.features = torch.tensor(feats, dtype=torch.long)
        self.positions = as_positions(positions)

    def prepare(self, model: Any) -> None:
        device = model_device(model)
        if self.sae.W_dec.device.type != device.type:
            raise UserError(f"the SAE is on {self.sae.W_dec.device} but the model is on {device}; move the SAE with sae.to('{device}')")

    def _target(self, f: Tensor) -> Tensor:
        raise NotImplementedError

    def apply(self, x: Tensor) -> Tensor:
        w_dec = self.sae.W_dec
        idx = self.features.to(w_dec.device)
        x_sae = x.to(w_dec.dtype)
        f = self.sae.encode(x_sae)[..., idx]
        delta = torch.einsum("bpm,md->bpd", self._target(f) - f, w_dec[idx])
        return (x_sae + delta).to(x.dtype)


class Clamp(_FeatureIntervention):
    """Pin SAE features to values (numbers, or ``"10x"`` = 10 × the feature's max activation)."""

    def __init__(self, sae: FeatureDictionary, features: int | Sequence[int], values: float | str | Sequence[float | str], hook: str | None = None, positions: Positions | str | None = None):
        super().__init__(sae, features, hook, positions)
        vals = list(values) if isinstance(values, (list, tuple)) else [values] * len(self.features)
        if len(vals) != len(self.features):
            raise UserError(f"got {len(vals)} clamp values for {len(self.features)} features; give one value or one per feature")
        resolved = []
        for feat, val in zip(self.features.tolist(), vals):
            mult = _multiple(val)
            if mult is None:
                resolved.append(_number(val))
                continue
            max_acts = getattr(sae, "max_activations", None)
            if max_acts is None:
                raise UserError(f"'{val}' is relative to the feature's max activation, but this SAE has no max_activations; compute feature stats for it or give an absolute value")
            resolved.append(mult * float(max_acts[feat]))
        self.values = torch.tensor(resolved, dtype=torch.float32)

    def _target(self, f: Tensor) -> Tensor:
        return self.values.to(f.device, f.dtype).expand_as(f)


class Scale(_FeatureIntervention):
    """Multiply SAE features by ``factor`` (0 ablates, 2 doubles), keeping the error term."""

    def __init__(self, sae: FeatureDictionary, features: int | Sequence[int], factor: float, hook: str | None = None, positions: Positions | str | None = None):
        super().__init__(sae, features, hook, positions)
        self.factor = _number(factor)

    def _target(self, f: Tensor) -> Tensor:
        return f * self.factor


class _FeatureAblation(_FeatureIntervention):
    def _target(self, f: Tensor) -> Tensor:
        return torch.zeros_like(f)


def _unit(vector: Tensor | Direction) -> Tensor:
    vec = (vector.vector if isinstance(vector, Direction) else torch.as_tensor(vector)).detach().float().reshape(-1)
    norm = float(vec.norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise UserError("the steering vector is zero or not finite; pass a real direction")
    return vec / norm


class Ablate(Intervention):
    """Remove a direction (x' = x − (x·u)u) or SAE features (clamp them to 0, error term kept).

    ``Ablate(hook, direction)`` or ``Ablate(sae=sae, features=[...])``.
    """

    def __new__(cls, hook: str | None = None, direction: Tensor | Direction | None = None, *, sae: FeatureDictionary | None = None, features: int | Sequence[int] | None = None, positions: Positions | str | None = None):
        if sae is not None:
            if features is None:
                raise UserError("Ablate(sae=...) needs features=[ids]")
            return _FeatureAblation(sae, features, hook, positions)
        return super().__new__(cls)

    def __init__(self, hook: str | None = None, direction: Tensor | Direction | None = None, *, sae: FeatureDictionary | None = None, features: int | Sequence[int] | None = None, positions: Positions | str | None = None):
        if direction is None:
            raise UserError("Ablate needs a direction (tensor or Direction) or sae= and features=")
        self.hook = hook or (direction.hook_name if isinstance(direction, Direction) else "")
        if not self.hook:
            raise UserError("Ablate needs a hook name when the direction is a plain tensor")
        self.unit = _unit(direction)
        self.positions = as_positions(positions)

    def prepare(self, model: Any) -> None:
        self.unit = self.unit.to(model_device(model))

    def apply(self, x: Tensor) -> Tensor:
        unit = self.unit.to(x.device, torch.float32)
        xf = x.float()
        return (xf - (xf @ unit)[..., None] * unit).to(x.dtype)


class Add(Intervention):
    """Add ``coef`` × unit(vector) to the activation; ``coef="4x"`` = 4 × mean residual norm at the hook."""

    def __init__(self, hook: str | None, vector: Tensor | Direction, coef: float | str, positions: Positions | str | None = None, norm_prompts: Sequence[str] | None = None):
        self.hook = hook or (vector.hook_name if isinstance(vector, Direction) else "")
        if not self.hook:
            raise UserError("Add needs a hook name when the vector is a plain tensor")
        self.unit = _unit(vector)
        self.coef_spec = coef
        mult = _multiple(coef)
        self.coef: float | None = _number(coef) if mult is None else None
        self.norm_prompts = tuple(norm_prompts) if norm_prompts else None
        self.positions = as_positions(positions)

    @classmethod
    def feature(cls, sae: FeatureDictionary, feature: int, coef: float | str, positions: Positions | str | None = None) -> Add:
        """Add along an SAE feature's decoder row at the SAE's hook."""
        n_latents = sae.W_dec.shape[0]
        if not 0 <= int(feature) < n_latents:
            raise UserError(f"feature {feature} is out of range; this SAE has features 0..{n_latents - 1}")
        return cls(sae.hook_name, sae.W_dec[int(feature)].detach(), coef, positions)

    def prepare(self, model: Any) -> None:
        if self.unit.numel() != model.cfg.d_model:
            raise UserError(f"the steering vector has {self.unit.numel()} entries but {self.hook} has d_model={model.cfg.d_model}; use a vector made for this model")
        if self.coef is None:
            self.coef = _multiple(self.coef_spec) * mean_residual_norm(model, self.hook, self.norm_prompts)  # type: ignore[operator]
        self.unit = self.unit.to(model_device(model))

    def apply(self, x: Tensor) -> Tensor:
        return (x.float() + self.coef * self.unit.to(x.device, torch.float32)).to(x.dtype)


def _check_hook(model: Any, hook: str) -> None:
    names = model.hook_dict
    if hook not in names:
        raise UserError(f"unknown hook {hook!r}{suggest(hook, names)}; use a name like blocks.0.hook_resid_post")


def _capture(model: Any, tokens: Tensor, hook: str) -> Float[Tensor, "pos d"]:
    """The activation at ``hook`` for one unpadded token sequence."""
    out: list[Tensor] = []

    def keep(x: Tensor, hook: Any) -> Tensor:
        out.append(x.detach()[0].float())
        return x

    with torch.inference_mode(), model.hooks(fwd_hooks=[(hook, keep)]):
        model(tokens[None].to(model_device(model)))
    return out[0]


def mean_residual_norm(model: Any, hook: str, prompts: Sequence[str] | None = None, chat: bool = False) -> float:
    """Mean L2 norm of the activation at ``hook`` over non-BOS tokens of ``prompts`` (default: shipped prompts); cached."""
    from interp.generation import encode_prompts
    from interp.steering_eval import load_steering_prompts

    _check_hook(model, hook)
    texts = tuple(prompts) if prompts else tuple(load_steering_prompts())
    key = (id(model), hook, texts)
    if key not in _NORM_CACHE:
        norms = [_capture(model, toks, hook)[1:].norm(dim=-1) for toks in encode_prompts(model, list(texts), chat=chat)]
        _NORM_CACHE[key] = float(torch.cat(norms).mean())
    return _NORM_CACHE[key]


def contrastive_vector(model: Any, positive_prompts: Sequence[str], negative_prompts: Sequence[str], hook: str, reduce: str = "last", chat: bool = False) -> Direction:
    """CAA vector (Rimsky et al. 2024): mean activation on positive prompts minus mean on negative ones.

    ``reduce="last"`` takes each prompt's last token; ``"mean"`` averages its non-BOS tokens.
    """
    from interp.generation import encode_prompts

    _check_hook(model, hook)
    if not positive_prompts or not negative_prompts:
        raise UserError("contrastive_vector needs at least one positive and one negative prompt")
    if reduce not in ("last", "mean"):
        raise UserError(f"reduce must be 'last' or 'mean', not {reduce!r}")

    def mean_act(prompts: Sequence[str]) -> Tensor:
        acts = [_capture(model, toks, hook) for toks in encode_prompts(model, list(prompts), chat=chat)]
        return torch.stack([a[-1] if reduce == "last" else a[1:].mean(0) if len(a) > 1 else a[0] for a in acts]).mean(0)

    vector = (mean_act(positive_prompts) - mean_act(negative_prompts)).cpu()
    from interp.models import model_name

    return Direction(vector=vector, hook_name=hook, model=model_name(model), source="caa", extra={"reduce": reduce, "chat": chat, "n_positive": len(positive_prompts), "n_negative": len(negative_prompts)})


def _hook_fn(intervention: Intervention, tracker: PositionTracker):
    def steer(x: Tensor, hook: Any) -> Tensor:
        if x.ndim != 3:
            raise UserError(f"steering works on [batch, pos, d] activations, but {intervention.hook} has shape {tuple(x.shape)}; choose a residual-stream hook")
        selected = tracker.mask(intervention.positions, x.shape[0], x.shape[1], x.device)
        if not bool(selected.any()):
            return x
        return torch.where(selected[..., None], intervention.apply(x), x)

    return steer


@contextmanager
def steered(model: Any, interventions: Intervention | Iterable[Intervention]) -> Iterator[Any]:
    """Apply ``interventions`` to every model call inside the block; hooks are removed on exit, also on errors."""
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    for iv in ivs:
        if not isinstance(iv, Intervention):
            raise UserError(f"{iv!r} is not an intervention; use interp.Clamp, Scale, Ablate or Add")
        _check_hook(model, iv.hook)
        iv.prepare(model)
    tracker = PositionTracker(getattr(model, "tokenizer", None))

    def see_call(module: Any, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        past = kwargs.get("past_key_values")
        continues = past is not None and (past.get_seq_length() if hasattr(past, "get_seq_length") else 1) > 0
        tracker.begin_call(tokens, kwargs.get("attention_mask"), continues)

    target = getattr(model, "original_model", None) or model
    handle = target.register_forward_pre_hook(see_call, with_kwargs=True)
    _ACTIVE.setdefault(id(model), []).append(tracker)
    try:
        with model.hooks(fwd_hooks=[(iv.hook, _hook_fn(iv, tracker)) for iv in ivs]):
            yield model
    finally:
        handle.remove()
        _ACTIVE[id(model)].remove(tracker)


@contextmanager
def prompt_lengths(model: Any, lengths: Tensor) -> Iterator[None]:
    """Tell active ``steered`` blocks how many real tokens of each row are prompt (used by generate)."""
    trackers = list(_ACTIVE.get(id(model), []))
    for tracker in trackers:
        tracker.prompt_lengths = lengths
    try:
        yield
    finally:
        for tracker in trackers:
            tracker.prompt_lengths = None
