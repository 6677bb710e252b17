"""``interp run CONFIG.toml``: one config runs the whole study into a run directory.

Stages (each cached by a hash of its inputs, see :mod:`experiments.stages`):
harvest → train → eval → dashboard → probes → steer, then ``report.html``. The run directory
holds ``config.toml`` (resolved), ``provenance.json``, ``metrics.jsonl`` (stage events plus
every training step), ``stages/<name>-<hash>/`` artefacts and ``report.html``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from experiments import study_stages
from experiments.config import STAGES, StudyConfig, check_against_model
from interp.configparse import to_plain
from experiments.provenance import provenance
from experiments.report import write_report
from experiments.stages import StageRunner
from experiments.tomlwrite import dumps_toml
from interp.errors import UserError
from interp.files import atomic_write_json, atomic_write_text

__all__ = ["run_study", "latest_sae_dirs"]


class _MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (append-only: earlier runs are kept)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, row: dict[str, Any]) -> None:
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def run_study(cfg: StudyConfig, stage: str | None = None, force: bool = False, model: Any = None, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` (or only ``stage``, reusing finished upstream stages); return stage summaries.

    ``force`` redoes the selected stages. ``model`` may be passed in (notebooks, tests) to skip loading.
    """
    if stage is not None and stage not in STAGES:
        from interp.errors import suggest

        raise UserError(f"unknown stage {stage!r}{suggest(stage, STAGES)}; stages are {', '.join(STAGES)}")
    if model is None:
        from interp.models import load_model

        device = None if cfg.model.device == "auto" else cfg.model.device
        model = load_model(cfg.model.name, device=device, dtype=getattr(__import__("torch"), cfg.model.dtype))
    check_against_model(cfg, model)  # before anything is written

    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", dumps_toml(to_plain(cfg)))
    prov = provenance(cfg.seed, str(next(model.parameters()).device))
    atomic_write_json(run_dir / "provenance.json", prov)
    log = _MetricsLog(run_dir / "metrics.jsonl")
    runner = StageRunner(run_dir, log)

    stages = study_stages.build(cfg, model, log, progress)
    skipped = []
    for st in stages:
        if not st.enabled:
            skipped.append(st.name)
            continue
        if any(dep not in runner.results for dep in st.depends):
            skipped.append(st.name)
            continue
        selected = stage is None or stage == st.name
        runner.run(st, force=force and selected, execute=selected)
        if stage == st.name:
            break
    write_report(run_dir, cfg.name, prov, runner.results, skipped)
    return {name: res.summary for name, res in runner.results.items()}


def latest_sae_dirs(run_dir: str | Path) -> list[Path]:
    """SAE directories of the newest finished train stage in ``run_dir`` (notebooks reuse them)."""
    done = sorted(Path(run_dir).glob("stages/train-*/stage.json"), key=lambda p: p.stat().st_mtime)
    if not done:
        return []
    return sorted(p.parent for p in done[-1].parent.glob("saes/*/cfg.json"))
