"""The activation store's on-disk layout and its crash-safe writer.

A store is a directory::

    manifest.json                          # written last, atomically, after every shard
    shards/<hook>/000000.safetensors       # key "acts": [rows, d_in] for one hook
    shards/_meta/000000.safetensors        # "tokens" [rows], "window" [rows], "position" [rows],
                                           # "window_tokens" [windows, ctx] (when known)

A shard exists for the reader only once ``manifest.json`` lists it with its sha256, so a crash
at any moment leaves the previous manifest and, at worst, orphan files that the next writer
deletes. Every path in the manifest is relative and resolved with :func:`contained_path`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.errors import UserError
from interp.faults import fault
from interp.files import atomic_write_bytes, atomic_write_json, contained_path

__all__ = ["FORMAT_VERSION", "MANIFEST", "DTYPES", "read_manifest", "StoreWriter"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
META_DIR = "_meta"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REQUIRED = ("format_version", "model", "hooks", "d_in", "dtype", "n_tokens", "n_windows", "complete", "shards")


def _package_versions() -> dict[str, str]:
    versions = {}
    for dist in ("interp-workbench", "torch", "transformer-lens", "transformers", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _hook_dir(hook: str) -> str:
    """Directory name of a hook's shards (TransformerLens names are already path-safe)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", hook)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``root/manifest.json``; a missing or malformed one is a one-line UserError."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} is not an activation store (no {MANIFEST}); create one with `interp harvest` or ActivationStore.from_tensors")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err.__class__.__name__}); the store is damaged, re-create it") from None
    missing = [k for k in _REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(_REQUIRED)
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; the store is damaged or not an activation store, re-create it")
    if manifest["format_version"] > FORMAT_VERSION:
        raise UserError(f"{root} uses store format {manifest['format_version']} but this version reads up to {FORMAT_VERSION}; upgrade interp-workbench")
    if manifest["dtype"] not in DTYPES:
        raise UserError(f"{path} names dtype {manifest['dtype']!r}; expected one of {', '.join(DTYPES)}")
    for shard in manifest["shards"]:
        for entry in [*shard["files"].values(), shard.get("meta")]:
            if entry is not None:
                contained_path(root, entry["path"])
    return manifest


class StoreWriter:
    """Appends shards to a store directory; the manifest is rewritten after each shard's files."""

    def __init__(self, root: str | os.PathLike, header: dict[str, Any], overwrite: bool = False):
        """Open ``root`` for writing: start a store, resume one with the same ``header["config"]``, or refuse.

        ``header`` holds the manifest fields (model, hooks, dtype, ctx, config ...); ``d_in`` may be
        left out and is then taken from the first shard.
        """
        self.root = Path(root)
        self.manifest = self._open(header, overwrite)
        self._clean_orphans()

    def _open(self, header: dict[str, Any], overwrite: bool) -> dict[str, Any]:
        manifest_path = self.root / MANIFEST
        if manifest_path.is_file():
            try:
                old = read_manifest(self.root)
            except UserError:
                if not overwrite:
                    raise
                old = {}  # a damaged manifest may be replaced when asked to
            if old.get("config") == header["config"]:
                return old
            if not overwrite:
                raise UserError(
                    f"{self.root} holds a store made with a different config ({_first_difference(old.get('config'), header['config'])}); "
                    "pass --overwrite to replace it or choose another --out"
                )
            # Unlist every shard first, so a crash during the deletion leaves an empty store.
            manifest_path.unlink()
            shutil.rmtree(self.root / SHARDS, ignore_errors=True)
        elif self.root.exists():
            if not self.root.is_dir():
                raise UserError(f"{self.root} exists and is a file; choose a directory for --out")
            foreign = [p.name for p in self.root.iterdir() if p.name != SHARDS and not p.name.startswith(".")]
            if foreign:
                raise UserError(f"{self.root} exists and is not an activation store (it holds {foreign[0]}); choose a new or empty --out")
        # Written with the first shard: until then a crash leaves no store, only orphans to clean.
        return {
            "format_version": FORMAT_VERSION,
            **header,
            "d_in": header.get("d_in") or {},
            "n_tokens": 0,
            "n_windows": 0,
            "complete": False,
            "package_versions": _package_versions(),
            "shards": [],
        }

    def _clean_orphans(self) -> None:
        """Delete shard files and temp files that no manifest entry names (left by a crash)."""
        listed = {contained_path(self.root, e["path"]) for s in self.manifest["shards"] for e in [*s["files"].values(), s.get("meta")] if e}
        shard_root = self.root / SHARDS
        for path in shard_root.rglob("*") if shard_root.is_dir() else []:
            if path.is_file() and path.resolve() not in listed:
                path.unlink()
        for path in self.root.glob(f".{MANIFEST}.*.tmp"):
            path.unlink()

    @property
    def n_tokens(self) -> int:
        """Rows stored so far."""
        return int(self.manifest["n_tokens"])

    @property
    def n_windows(self) -> int:
        """Context windows stored so far (the resume point in the window sequence)."""
        return int(self.manifest["n_windows"])

    @property
    def complete(self) -> bool:
        """Whether :meth:`finish` has run."""
        return bool(self.manifest["complete"])

    def append(self, acts: dict[str, Tensor], meta: dict[str, Tensor] | None, n_windows: int) -> None:
        """Write one shard (``acts[hook]``: [rows, d_in]; ``meta``: row metadata) and then the manifest."""
        index = len(self.manifest["shards"])
        rows = {int(a.shape[0]) for a in acts.values()}
        assert len(rows) == 1 and set(acts) == set(self.manifest["hooks"]), "every hook needs the same rows"
        n_rows = rows.pop()
        dtype = DTYPES[self.manifest["dtype"]]
        if not self.manifest["d_in"]:
            self.manifest["d_in"] = {hook: int(acts[hook].shape[1]) for hook in self.manifest["hooks"]}
        files = {}
        for hook, tensor in acts.items():
            assert tensor.shape[1] == self.manifest["d_in"][hook], "a hook's width changed between shards"
            files[hook] = self._write(f"{SHARDS}/{_hook_dir(hook)}/{index:06d}.safetensors", {"acts": tensor.to(dtype)})
            fault("store.shard_file")
        start, w_start = self.n_tokens, self.n_windows
        self.manifest["shards"].append(
            {
                "rows": [start, start + n_rows],
                "windows": [w_start, w_start + n_windows],
                "files": files,
                "meta": self._write(f"{SHARDS}/{META_DIR}/{index:06d}.safetensors", meta) if meta else None,
            }
        )
        self.manifest["n_tokens"] = start + n_rows
        self.manifest["n_windows"] = w_start + n_windows
        fault("store.before_manifest")
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def finish(self) -> None:
        """Mark the store complete (the last manifest write)."""
        self.manifest["complete"] = True
        fault("store.before_finish")
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def _write(self, relative: str, tensors: dict[str, Tensor]) -> dict[str, str]:
        from safetensors.torch import save

        # Hash the bytes we write rather than re-reading the file afterwards.
        data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        atomic_write_bytes(contained_path(self.root, relative), data)
        return {"path": relative, "sha256": hashlib.sha256(data).hexdigest()}


def _first_difference(old: Any, new: Any) -> str:
    """Name the first config key whose value differs, for the refusal message."""
    if not isinstance(old, dict):
        return "no recorded config"
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} there, {new.get(key)!r} now"
    return "same keys"
