"""Plots of a run's metrics.jsonl (matplotlib is optional: `pip install minioprd[plot]`)."""

from __future__ import annotations

import io
from pathlib import Path

from minioprd.files import atomic_write_bytes, read_jsonl

PANELS = [("loss", "loss"), ("cos", "mean cosine to teacher"), ("response_len", "response length (tokens)"),
          ("distinct", "distinct-token ratio")]


def plot_metrics(metrics: str | Path, png: str | Path) -> bool:
    """Write a 2x2 PNG of the main curves; returns False (and writes nothing) without matplotlib or data."""
    rows = read_jsonl(metrics)
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())
    return True
