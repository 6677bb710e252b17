"""The run's ``report.html``: one self-contained page (inline CSS, no network) linking everything."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from experiments.stages import StageResult
from interp.files import atomic_write_text

__all__ = ["write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:70rem;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #dde;padding:.25rem .6rem;text-align:left;font-size:.9rem}
th{background:#f3f5fa}.muted{color:#667}code{background:#f3f5fa;padding:0 .2rem}
pre{background:#f7f8fb;padding:.6rem;overflow-x:auto;font-size:.8rem}
"""

_LINKABLE = (".html", ".json", ".jsonl", ".png", ".toml", ".safetensors")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return html.escape(json.dumps(value)[:300])
    return html.escape(str(value))


def _table(rows: dict[str, Any]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows.items())
    return f"<table>{body}</table>"


def _links(run_dir: Path, directory: Path) -> str:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in _LINKABLE and not p.name.startswith("."))
    if not files:
        return ""
    items = "".join(f'<li><a href="{html.escape(str(p.relative_to(run_dir)))}">{html.escape(str(p.relative_to(directory)))}</a></li>' for p in files[:60])
    more = f"<li class=muted>… {len(files) - 60} more</li>" if len(files) > 60 else ""
    return f"<ul>{items}{more}</ul>"


def write_report(run_dir: Path, name: str, provenance: dict, results: dict[str, StageResult], skipped: list[str]) -> Path:
    """Write ``run_dir/report.html`` summarising every stage with relative links to its files."""
    run_dir = Path(run_dir)
    sections = []
    for stage in results.values():
        state = "reused from an earlier run" if stage.cached else f"ran in {stage.seconds:.1f} s"
        sections.append(
            f"<h2>{html.escape(stage.name)}</h2><p class=muted>{state} · <code>{html.escape(str(stage.directory.relative_to(run_dir)))}</code></p>"
            f"{_table(stage.summary) if stage.summary else ''}{_links(run_dir, stage.directory)}"
        )
    if skipped:
        sections.append(f"<h2>Skipped</h2><p>{html.escape(', '.join(skipped))} (disabled in the config)</p>")
    prov = {k: v for k, v in provenance.items() if k != "packages"}
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(name)} — interp report</title>"
        f"<style>{_CSS}</style></head><body><h1>Study: {html.escape(name)}</h1>"
        f'<p><a href="config.toml">config.toml</a> · <a href="metrics.jsonl">metrics.jsonl</a> · <a href="provenance.json">provenance.json</a></p>'
        f"{''.join(sections)}<h2>Provenance</h2>{_table(prov)}{_table(provenance.get('packages', {}))}</body></html>"
    )
    return atomic_write_text(run_dir / "report.html", page)
