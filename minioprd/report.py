"""Looking at a run: plots of its metrics.jsonl and a short markdown summary.

    minioprd report runs/qwen2.5-7b-to-0.5b            # -> runs/.../report/{report.md, loss.png, ...}
    from minioprd.report import write_report; write_report("runs/x")

PNGs: loss.png (total and its parts), layer_cos.png (cosine to the teacher per mapped layer, from the
`layer_cos` lists), eval.png (every `eval/...` key of the in-loop evaluation), response_len.png (length,
EOS fraction, distinct-token ratio) and throughput.png (generated tokens/s, seconds per step). matplotlib is
optional (`pip install 'minioprd[plot]'`): without it report.md is still written, and the caller gets
MATPLOTLIB_MISSING to print. Every file is written atomically (files.py).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from minioprd.errors import MinioprdError
from minioprd.files import atomic_write_bytes, atomic_write_text, read_jsonl

PANELS = [("loss", "loss"), ("cos", "mean cosine to teacher"), ("response_len", "response length (tokens)"),
          ("distinct", "distinct-token ratio")]
MATPLOTLIB_MISSING = ("matplotlib is not installed, so report.md was written without plots: "
                      "`pip install 'minioprd[plot]'` adds them")
# For "best" in the summary: eval metrics (by name part) where lower / higher is better; others get no "best".
LOWER_IS_BETTER = ("kl", "loss", "repetition", "no_answer")
HIGHER_IS_BETTER = ("accuracy", "acc", "pass", "maj", "avg", "cos", "distinct")


def _num(v: Any) -> float:
    """A plottable float: None, text and non-finite values become NaN (a gap in the curve)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Render a matplotlib figure to PNG atomically (temp file + rename) and close it."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_metrics(metrics: str | Path, png: str | Path) -> bool:
    """Write a 2x2 PNG of the main curves; returns False (and writes nothing) without matplotlib or data."""
    rows = [r for r in read_jsonl(metrics) if r.get("step", 0) >= 1 and "loss" in r]
    if not rows:
        return False
    try:
        plt = _pyplot()
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.plot(steps, [_num(r.get(key)) for r in rows], lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, Path(png))
    return True


# --------------------------------------------------------------------------------------------- reading a run


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """metrics.jsonl split into training steps and eval lines, plus summary.json and config.yaml if present."""
    import json

    import yaml

    d = Path(run_dir)
    if not d.is_dir():
        raise MinioprdError(f"run directory {str(d)!r} does not exist: pass the train.output_dir of a distill run")
    rows = read_jsonl(d / "metrics.jsonl")
    if not rows:
        raise MinioprdError(f"{str(d / 'metrics.jsonl')!r} is missing or empty: is {str(d)!r} a minioprd run "
                            f"directory (train.output_dir), and has it finished a step?")
    steps = [r for r in rows if r.get("step", 0) >= 1 and "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    summary, config = {}, {}
    try:
        summary = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    try:
        config = yaml.safe_load((d / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    return {"dir": d, "steps": steps, "evals": evals, "summary": summary, "config": config}


def _eval_keys(evals: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in evals:
        keys += [k for k in r if k.startswith("eval/") and k not in keys and not math.isnan(_num(r[k]))]
    return keys


# --------------------------------------------------------------------------------------------- plots


def plot_run(run: dict[str, Any], out_dir: Path) -> list[Path]:
    """The report's PNGs (those the data allows); raises ImportError without matplotlib."""
    plt = _pyplot()
    rows, evals = run["steps"], run["evals"]
    steps = [r["step"] for r in rows]
    written: list[Path] = []

    def series(key: str) -> list[float]:
        return [_num(r.get(key)) for r in rows]

    def has(key: str) -> bool:
        return any(not math.isnan(v) for v in series(key))

    if rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("loss", "loss (total)"), ("loss_rep", "representation"), ("loss_opd", "OPD")):
            vals = series(key)
            if has(key) and (key == "loss" or any(v != 0 for v in vals if not math.isnan(v))):
                ax.plot(steps, vals, lw=1.5, label=label)
        finite = [v for v in series("loss") if not math.isnan(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
            ax.set_yscale("log")
        ax.set(title="loss", xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(save_png(fig, out_dir / "loss.png"))

    cos_rows = [r for r in rows if r.get("layer_cos")]
    if cos_rows:
        n_layers = max(len(r["layer_cos"]) for r in cos_rows)
        grid = [[_num(r["layer_cos"][i]) if i < len(r["layer_cos"]) else float("nan") for r in cos_rows]
                for i in range(n_layers)]  # (layers, steps)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
        im = ax1.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                        extent=(cos_rows[0]["step"] - 0.5, cos_rows[-1]["step"] + 0.5, 0.5, n_layers + 0.5))
        fig.colorbar(im, ax=ax1, label="cosine")
        ax1.set(title="cosine to the teacher per mapped layer", xlabel="step", ylabel="mapped layer (1 = first)")
        from matplotlib.ticker import MaxNLocator

        ax1.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
        cs = [r["step"] for r in cos_rows]
        ax2.plot(cs, [_num(r.get("cos")) for r in cos_rows], lw=1.5, label="mean over layers")
        ax2.plot(cs, [_num(r["layer_cos"][-1]) for r in cos_rows], lw=1.5, label="last layer")
        ax2.plot(cs, [_num(r["layer_cos"][0]) for r in cos_rows], lw=1, ls="--", label="first layer")
        ax2.set(title="cosine", xlabel="step")
        ax2.grid(alpha=0.3)
        ax2.legend()
        fig.tight_layout()
        written.append(save_png(fig, out_dir / "layer_cos.png"))

    keys = _eval_keys(evals)
    if keys:
        cols = min(3, len(keys))
        nrows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            pts = [(r["step"], _num(r.get(key))) for r in evals if key in r]
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", lw=1.5)
            ax.set(title=key, xlabel="step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(save_png(fig, out_dir / "eval.png"))

    if rows and has("response_len"):
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, series("response_len"), lw=1.5, label="response length (tokens)")
        ax.set(title="responses", xlabel="step", ylabel="tokens")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        for key, label, style in (("eos_frac", "ended with EOS", "--"), ("distinct", "distinct-token ratio", ":")):
            if has(key):
                ax2.plot(steps, series(key), lw=1.2, ls=style, label=label, color="C1" if key == "eos_frac" else "C2")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("fraction")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="best")
        fig.tight_layout()
        written.append(save_png(fig, out_dir / "response_len.png"))

    if rows and has("tokens_per_s"):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot(steps, series("tokens_per_s"), lw=1.5)
        ax1.set(title="rollout throughput", xlabel="step", ylabel="generated tokens / s")
        ax1.grid(alpha=0.3)
        for key, label in (("rollout_s", "rollout"), ("teacher_s", "teacher"), ("update_s", "student update"),
                           ("step_s", "whole step")):
            if has(key):
                ax2.plot(steps, series(key), lw=1.5, label=label)
        ax2.set(title="time per step", xlabel="step", ylabel="seconds")
        ax2.grid(alpha=0.3)
        ax2.legend()
        fig.tight_layout()
        written.append(save_png(fig, out_dir / "throughput.png"))
    return written


# --------------------------------------------------------------------------------------------- markdown


def _fmt(v: Any) -> str:
    f = _num(v)
    if math.isnan(f):
        return "–"
    return f"{f:.4g}" if abs(f) < 1e4 else f"{f:,.0f}"


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(run: dict[str, Any], pngs: list[Path], out_dir: Path) -> str:
    """The markdown summary: what ran, first/last/best of the main curves, eval, warnings, the plots."""
    rows, evals, cfg, summ = run["steps"], run["evals"], run["config"], run["summary"]
    model, loss, train = cfg.get("model", {}), cfg.get("loss", {}), cfg.get("train", {})
    lines = [f"# minioprd run: {run['dir'].name}", ""]
    if model:
        lines.append(f"- **teacher** {model.get('teacher')} ({model.get('teacher_quant')}) -> **student** "
                     f"{model.get('student')}" + (f", objective {loss.get('objective')}" if loss.get("objective")
                                                  else "") + f", loss {loss.get('kind')}, layers {loss.get('layers')}")
    done = rows[-1]["step"] if rows else 0
    total = train.get("steps") or summ.get("steps") or done
    secs = summ.get("seconds") or (rows[-1].get("elapsed_s") if rows else None)
    took = "" if not secs else (f" in {_num(secs):.1f} s" if _num(secs) < 120 else f" in {_num(secs) / 60:.1f} min")
    lines.append(f"- **steps** {done} of {total}" + took
                 + (f" ({_num(secs) / max(done, 1):.2f} s/step)" if secs and done else ""))
    lines += ["", "| metric | first | last | best | mean |", "|---|---|---|---|---|"]
    for key, label, better in (("loss", "loss", min), ("cos", "cosine to teacher (mean of layers)", max),
                               ("cos_last", "cosine, last layer", max), ("response_len", "response length", None),
                               ("eos_frac", "responses ending in EOS", None),
                               ("distinct", "distinct-token ratio", None), ("tokens_per_s", "rollout tokens/s", None),
                               ("step_s", "seconds/step", None)):
        vals = [_num(r.get(key)) for r in rows]
        good = [v for v in vals if not math.isnan(v)]
        if not good:
            continue
        best = better(good) if better else float("nan")
        lines.append(f"| {label} | {_fmt(vals[0])} | {_fmt(vals[-1])} | {_fmt(best)} | {_fmt(_mean(vals))} |")
    keys = _eval_keys(evals)
    if keys:
        lines += ["", "## Evaluation", "", "| metric | " + " | ".join(f"step {r['step']}" for r in evals[:1])
                  + " | last | best |", "|---|---|---|---|"]
        for key in keys:
            pts = [(r["step"], _num(r[key])) for r in evals if key in r and not math.isnan(_num(r[key]))]
            if not pts:
                continue
            name = key.removeprefix("eval/")
            pick = min if any(w in name for w in LOWER_IS_BETTER) else \
                (max if any(w in name for w in HIGHER_IS_BETTER) else None)
            best = f"{_fmt(pick(pts, key=lambda p: p[1])[1])} (step {pick(pts, key=lambda p: p[1])[0]})" if pick \
                else "–"
            lines.append(f"| {key} | {_fmt(pts[0][1])} | {_fmt(pts[-1][1])} (step {pts[-1][0]}) | {best} |")
    cos_rows = [r for r in rows if r.get("layer_cos")]
    if cos_rows:
        first, last = cos_rows[0]["layer_cos"], cos_rows[-1]["layer_cos"]
        worst = min(range(len(last)), key=lambda i: _num(last[i]) if not math.isnan(_num(last[i])) else 2.0)
        lines += ["", f"Per-layer cosine, step {cos_rows[0]['step']} -> {cos_rows[-1]['step']}: "
                  + ", ".join(f"{i + 1}: {_fmt(a)}->{_fmt(b)}" for i, (a, b) in enumerate(zip(first, last)))
                  + f". Lowest now: mapped layer {worst + 1}. A high cosine alone does not show the student "
                  f"matches the teacher's outputs; check eval/kl or the task accuracy."]
    warns = []
    bad = max((int(v) for v in (_num(r.get("nonfinite_steps")) for r in rows) if not math.isnan(v)), default=0)
    if bad:
        warns.append(f"{bad} step(s) skipped for a non-finite loss or gradient")
    collapsed = [r["step"] for r in rows if r.get("collapse_warning")]
    if collapsed:
        warns.append(f"rollouts repeated themselves (distinct-token ratio below threshold) at {len(collapsed)} "
                     f"step(s), first at step {collapsed[0]}: lower train.lr or add an output-space term")
    if summ.get("skipped_prompts"):
        warns.append(f"{summ['skipped_prompts']} prompts were longer than data.max_prompt_tokens and skipped")
    if done and total and done < total:
        warns.append(f"the run stopped at step {done} of {total} (resume with `minioprd distill --resume "
                     f"{run['dir']}`)")
    if warns:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warns]
    if pngs:
        lines += ["", "## Plots", ""]
        for p in pngs:
            rel = Path(p).resolve().relative_to(out_dir.resolve()) if Path(p).resolve().is_relative_to(
                out_dir.resolve()) else Path(p)
            lines.append(f"![{Path(p).stem}]({rel.as_posix()})")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write report.md and the PNGs into out_dir (default RUN_DIR/report).

    Returns {"md": path, "pngs": [paths], "plots_missing": MATPLOTLIB_MISSING or None}.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run["dir"] / "report"
    out.mkdir(parents=True, exist_ok=True)
    try:
        pngs, missing = plot_run(run, out), None
    except ImportError:
        pngs, missing = [], MATPLOTLIB_MISSING
    md = out / "report.md"
    atomic_write_text(md, summarize(run, pngs, out))
    return {"md": md, "pngs": pngs, "plots_missing": missing}
