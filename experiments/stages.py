"""Stage bookkeeping for a run directory: content-hashed, resumable, skippable stages.

Each stage's output lives in ``stages/<name>-<hash>/`` where the hash covers the config values
the stage reads and the hashes of the stages it depends on. A finished stage writes
``stage.json`` last (atomically); re-running the same config skips it, an interrupted stage
finds its partial outputs in the same directory and resumes them (harvest and training resume
on their own), and a changed config gets a new directory, so nothing written before is lost.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.faults import fault
from interp.files import atomic_write_json

__all__ = ["Stage", "StageResult", "StageRunner", "hash_inputs"]

STAGE_FORMAT_VERSION = 1


def hash_inputs(obj: Any) -> str:
    """Stable short hash of JSON-able stage inputs."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class Stage:
    """One step of a study."""

    name: str
    """Stage name used on the command line (`--stage NAME`)."""
    inputs: Callable[[], Any]
    """Returns the config values the stage reads (hashed to key its output)."""
    run: Callable[[Path, dict[str, StageResult]], dict]
    """Does the work in the given directory; gets finished upstream results; returns a summary."""
    depends: tuple[str, ...] = ()
    """Stages whose outputs it reads."""
    enabled: bool = True
    """Disabled stages are recorded as skipped."""


@dataclass
class StageResult:
    """A finished stage: where its outputs are and what it reported."""

    name: str
    directory: Path
    hash: str
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False


class StageRunner:
    """Runs stages in order into ``run_dir``, logging each to ``metrics.jsonl``."""

    def __init__(self, run_dir: Path, log: Callable[[dict], None]):
        self.run_dir = Path(run_dir)
        self.log = log
        self.results: dict[str, StageResult] = {}

    def _key(self, stage: Stage) -> str:
        upstream = {d: self.results[d].hash for d in stage.depends if d in self.results}
        return hash_inputs({"v": STAGE_FORMAT_VERSION, "stage": stage.name, "inputs": stage.inputs(), "upstream": upstream})

    def directory(self, stage: Stage) -> tuple[Path, str]:
        key = self._key(stage)
        return self.run_dir / "stages" / f"{stage.name}-{key}", key

    def finished(self, stage: Stage) -> StageResult | None:
        """The stage's result if it already finished with the same inputs."""
        directory, key = self.directory(stage)
        marker = directory / "stage.json"
        if not marker.is_file():
            return None
        meta = json.loads(marker.read_text())
        if meta.get("hash") != key:
            return None
        return StageResult(stage.name, directory, key, meta.get("summary", {}), meta.get("seconds", 0.0), cached=True)

    def run(self, stage: Stage, force: bool = False, execute: bool = True) -> StageResult | None:
        """Run (or reuse) one stage. With ``execute=False`` only a finished result is loaded."""
        missing = [d for d in stage.depends if d not in self.results]
        if missing:
            from interp.errors import UserError

            raise UserError(f"stage {stage.name!r} needs {', '.join(missing)} to have run first; run the whole config once or those stages with --stage")
        directory, key = self.directory(stage)
        if force and directory.exists():
            shutil.rmtree(directory)
        done = self.finished(stage)
        if done is not None:
            self.results[stage.name] = done
            self.log({"event": "stage_cached", "stage": stage.name, "hash": key})
            return done
        if not execute:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        self.log({"event": "stage_start", "stage": stage.name, "hash": key})
        start = time.perf_counter()
        summary = stage.run(directory, self.results) or {}
        seconds = time.perf_counter() - start
        atomic_write_json(directory / "stage.json", {"hash": key, "stage": stage.name, "seconds": seconds, "summary": summary})
        fault("stage.done")
        result = StageResult(stage.name, directory, key, summary, seconds)
        self.results[stage.name] = result
        self.log({"event": "stage_done", "stage": stage.name, "hash": key, "seconds": round(seconds, 2), **{f"summary.{k}": v for k, v in summary.items() if isinstance(v, int | float | str)}})
        return result
