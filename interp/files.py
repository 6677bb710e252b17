"""Atomic, checksummed, contained file writes shared by every package.

Every artefact is written to a temporary file in the destination directory, flushed and
fsync'ed, then renamed over the target, so a crash leaves either the old file or the new one,
never a torn one. ``OSError`` from a full or read-only disk becomes a :class:`UserError` and the
temporary file is removed, so nothing already written is damaged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interp.errors import UserError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "save_safetensors_atomic",
    "sha256_file",
    "contained_path",
    "fsync_dir",
]


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so that a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_error(path: Path, err: OSError) -> UserError:
    if err.errno == errno.ENOSPC:
        return UserError(f"no space left on the device while writing {path}; free some disk space or choose another --out, then re-run")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: the location is read-only or not permitted ({os.strerror(err.errno)}); choose a writable --out")
    return UserError(f"cannot write {path}: {err.strerror or err}; check the path and the disk, then re-run")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` atomically: ``write(tmp_path)`` fills a temp file that is then renamed over ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as err:
        raise _disk_error(path, err) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write raw bytes."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_safetensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Atomically save a dict of tensors as safetensors (tensors are made contiguous on CPU)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def contained_path(root: str | os.PathLike, relative: str) -> Path:
    """Resolve ``relative`` inside ``root``; refuse absolute paths and ``..`` escapes (manifests, cfgs)."""
    root_p = Path(root).resolve()
    if os.path.isabs(relative):
        raise UserError(f"path {relative!r} in {root} is absolute; artefact files must name paths inside their own directory")
    target = (root_p / relative).resolve()
    if target != root_p and root_p not in target.parents:
        raise UserError(f"path {relative!r} escapes its directory {root}; the file may be tampered with, re-create it")
    return target
