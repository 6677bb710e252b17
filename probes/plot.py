"""The per-layer probe curve: plotly HTML (interactive) and, when matplotlib is installed, PNG."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from interp.files import atomic_write, atomic_write_text

__all__ = ["plot_layer_curve", "CURVES"]

CURVES = {
    "accuracy": "logistic probe",
    "mass_mean_accuracy": "mass-mean probe",
    "control_accuracy": "control task",
    "shuffled_accuracy": "shuffled labels",
}
"""Metric key -> legend label of each plotted curve (test accuracy per layer)."""


def _title(metrics: dict[str, Any]) -> str:
    return f"{metrics.get('task', '')} on {metrics.get('model', '')} ({metrics.get('pooling', '')} pooling)"


def plot_layer_curve(metrics: dict[str, Any], html_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> list[Path]:
    """Write test accuracy per layer for every curve in :data:`CURVES`; returns the files written."""
    import plotly.graph_objects as go

    rows = metrics["layers"]
    layers = [r["layer"] for r in rows]
    fig = go.Figure()
    for key, label in CURVES.items():
        fig.add_trace(go.Scatter(x=layers, y=[r[key] for r in rows], mode="lines+markers", name=label))
    fig.update_layout(title=_title(metrics), xaxis_title="layer (hook_resid_post)", yaxis_title="test accuracy",
                      yaxis_range=[0, 1.02], template="plotly_white")
    # The plotly.js bundle is inlined so the HTML opens offline.
    written = [atomic_write_text(html_path, fig.to_html(include_plotlyjs=True, full_html=True))]
    if png_path is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return written
        figure, axis = plt.subplots(figsize=(7, 4))
        for key, label in CURVES.items():
            axis.plot(layers, [r[key] for r in rows], marker="o", label=label)
        axis.set(xlabel="layer (hook_resid_post)", ylabel="test accuracy", ylim=(0, 1.02), title=_title(metrics))
        axis.legend()
        figure.tight_layout()
        written.append(atomic_write(png_path, lambda tmp: figure.savefig(tmp, format="png", dpi=120)))
        plt.close(figure)
    return written
