"""`interp run CONFIG.toml`: the whole study from one config (prompts are raw text, no chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from experiments.app import command, console


@command("run")
def run(
    config: Path = typer.Argument(..., help="Study config (.toml), e.g. experiments/configs/quickstart.toml."),
    stage: Optional[str] = typer.Option(None, help="Run only this stage (harvest, train, eval, dashboard, probes, steer); upstream stages must be finished."),
    force: bool = typer.Option(False, "--force", help="Redo the selected stages even if finished."),
    out: Optional[Path] = typer.Option(None, help="Run directory (overrides the config's `out`)."),
) -> None:
    """Run a study end to end: harvest → train SAEs → evaluate → dashboards → probes → steering demo.

    Finished stages are reused when their inputs are unchanged; an interrupted stage resumes.
    The steering demo feeds raw-text prompts (no chat template).
    """
    from experiments.config import load_study
    from experiments.study import run_study

    cfg = load_study(config, {"out": str(out)} if out else None)
    summaries = run_study(cfg, stage=stage, force=force)
    for name, summary in summaries.items():
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
        console.print(f"[bold]{name}[/bold]: {shown}")
    console.print(f"report: {cfg.run_dir() / 'report.html'}")
