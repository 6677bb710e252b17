"""Offline feature dashboards: one self-contained HTML file per SAE (no CDN, no network).

The page inlines its CSS, its JavaScript, plotly.js from the installed ``plotly`` package, and the
feature data as JSON: a searchable feature list and, per feature, highlighted top contexts, an
activation histogram, the logit-lens table and the nearest decoder neighbours. A
:class:`Dashboard` also renders inside Jupyter (``_repr_html_``, in a sandboxed iframe).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from interp.errors import UserError
from interp.files import atomic_write_text
from saes.features import HIST_EDGES, FeatureScan, logit_lens, neighbours, scan_features, token_strings, top_contexts

__all__ = ["Dashboard", "build_dashboard", "dashboard_data", "render_html"]

_TEMPLATE = "dashboard_template.html"


@dataclass
class Dashboard:
    """A rendered dashboard: the HTML text and the data it was built from."""

    html: str
    """The complete, self-contained HTML document."""
    data: dict[str, Any]
    """The JSON-able feature data embedded in the page."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write the HTML atomically to ``path``."""
        return atomic_write_text(path, self.html)

    def _repr_html_(self) -> str:
        # An iframe keeps the page's scripts and styles away from the notebook's own.
        return f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:720px;border:1px solid #ddd" sandbox="allow-scripts"></iframe>'


def _context_span(model: Any, ctx: dict[str, Any], left: int, right: int) -> dict[str, Any]:
    """Trim a context to ``left`` tokens before and ``right`` after its max token (position 0 dropped: BOS)."""
    pos = ctx["position"]
    lo, hi = max(1, pos - left), min(ctx["window"].numel(), pos + right + 1)
    return {
        "tokens": token_strings(model, ctx["window"][lo:hi]),
        "acts": [round(float(a), 5) for a in ctx["acts"][lo:hi]],
        "max_index": pos - lo,
        "value": ctx["value"],
    }


def dashboard_data(sae: Any, model: Any, scan: FeatureScan, features: list[int], left: int = 24, right: int = 8, n_logits: int = 10, n_neighbours: int = 8, batch_size: int = 8) -> dict[str, Any]:
    """The JSON-able page data for ``features`` from a finished :func:`scan_features` pass."""
    from interp.models import model_name

    contexts = top_contexts(sae, model, scan, features, batch_size)
    lens = logit_lens(sae, model, features, n_logits)
    near = neighbours(sae, features, n_neighbours)
    centers = (HIST_EDGES[:-1] * HIST_EDGES[1:]).sqrt()  # geometric bin centres
    items = []
    for i in features:
        counts = scan.histograms[i]
        nz = counts.nonzero().flatten()
        lo, hi = (int(nz.min()), int(nz.max()) + 1) if nz.numel() else (0, 0)
        spans = [_context_span(model, c, left, right) for c in contexts[i]]
        items.append({
            "id": i,
            "max": float(scan.max_activations[i]),
            "mean_active": float(scan.mean_active[i]),
            "frequency": float(scan.frequency[i]),
            "n_fired": int(counts.sum()),
            "hist": {"centers": [float(c) for c in centers[lo:hi]], "counts": counts[lo:hi].tolist()},
            "contexts": spans,
            "logits": {key: [[t, round(v, 4)] for t, v in lens[i][key]] for key in ("top", "bottom")},
            "neighbours": [[j, round(c, 4)] for j, c in near[i]],
            "search_text": " ".join([t for t, _ in lens[i]["top"]] + ["".join(s["tokens"]) for s in spans[:3]]),
        })
    meta = {
        "model": model_name(model),
        "hook_name": sae.hook_name,
        "n_latents": int(sae.W_dec.shape[0]),
        "k": getattr(sae, "k", None),
        "n_tokens": scan.n_tokens,
        "source": scan.source,
    }
    return {"title": f"SAE features: {meta['hook_name']}", "meta": meta, "features": items}


def render_html(data: dict[str, Any]) -> str:
    """Fill the template with plotly.js and ``data`` (JSON escaped so no ``</script>`` can close the tag)."""
    from plotly.offline import get_plotlyjs

    template = resources.files("saes").joinpath(_TEMPLATE).read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")
    plotly_js = get_plotlyjs()
    assert "</script" not in plotly_js.lower()
    # Plain replace, payload last: the data itself may contain placeholder-like text.
    page = template.replace("__TITLE__", html.escape(data["title"])).replace("__PLOTLY_JS__", plotly_js)
    return page.replace("__DASHBOARD_DATA__", payload)


def build_dashboard(
    sae: Any,
    model: Any,
    source: Any = "default",
    features: list[int] | None = None,
    n_tokens: int = 32_768,
    n_features: int = 32,
    ctx: int = 128,
    batch_size: int = 8,
    top_k: int = 10,
    seed: int = 0,
    scan: FeatureScan | None = None,
    progress: bool = True,
) -> Dashboard:
    """Scan ``n_tokens`` of ``source`` and build a dashboard for ``features``.

    Without ``features``, ``n_features`` of the latents that fired are drawn at random (``seed``),
    so the page shows a fair sample rather than only the densest latents.
    """
    if scan is None:
        scan = scan_features(sae, model, source, n_tokens, ctx, batch_size, top_k, seed, progress)
    if features is None:
        alive = (scan.frequency > 0).nonzero().flatten()
        if alive.numel() == 0:
            raise UserError("no latent fired on the scanned tokens; raise --tokens or check that the SAE matches the model and hook")
        g = torch.Generator().manual_seed(seed)
        features = sorted(alive[torch.randperm(alive.numel(), generator=g)[:n_features]].tolist())
    if not features:
        raise UserError("no features to show; pass --features 1,2,3 or a positive --n-features")
    data = dashboard_data(sae, model, scan, [int(i) for i in features], batch_size=batch_size)
    return Dashboard(html=render_html(data), data=data)
