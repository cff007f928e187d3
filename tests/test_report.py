"""`minioprd report`: PNGs and report.md from a run's metrics.jsonl; matplotlib optional."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minioprd.cli import app
from minioprd.config import load_config, to_yaml
from minioprd.report import MATPLOTLIB_MISSING, plot_metrics, write_report

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(d: Path, steps: int = 6, opd_only: bool = False) -> Path:
    """A run directory as distill writes it: step-0 eval line, step lines (eval merged into some), config, summary."""
    d.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "eval/accuracy": 0.10, "eval/kl": 0.90, "eval/cos_mean": 0.50}]
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": 1.0 / s, "loss_rep": 0.0 if opd_only else 1.0 / s, "loss_opd": 1.0 / s if opd_only
               else 0.0, "cos": None if opd_only else 0.5 + 0.05 * s, "cos_last": None if opd_only else 0.6 + 0.05 * s,
               "layer_cos": [] if opd_only else [0.4 + 0.05 * s, 0.5 + 0.05 * s, 0.6 + 0.05 * s],
               "response_len": 100 + s, "eos_frac": 0.5, "distinct": 0.9 if s != 4 else 0.2,
               "collapse_warning": s == 4, "nonfinite_steps": 1 if s >= 5 else 0, "tokens_per_s": 300.0 + s,
               "rollout_s": 1.0, "update_s": 0.5, "step_s": 1.5, "elapsed_s": 1.5 * s}
        if s % 3 == 0:
            rec.update({"eval/accuracy": 0.1 + 0.05 * s, "eval/kl": 0.9 - 0.1 * s, "eval/cos_mean": 0.5 + 0.04 * s})
        lines.append(rec)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (d / "config.yaml").write_text(to_yaml(load_config(None, {"model.teacher": "Qwen2.5-7B", "train.steps": 10})))
    (d / "summary.json").write_text(json.dumps({"steps": 10, "seconds": 9.0, "skipped_prompts": 3}))
    return d


def test_report_writes_every_plot_and_a_summary(tmp_path):
    run = _synthetic_run(tmp_path / "run")
    r = write_report(run)
    names = {p.name for p in r["pngs"]}
    assert names == {"loss.png", "layer_cos.png", "eval.png", "response_len.png", "throughput.png"}
    for p in r["pngs"]:
        assert p.parent == run / "report" and p.read_bytes().startswith(PNG)
    assert r["plots_missing"] is None
    md = r["md"].read_text()
    assert "Qwen2.5-7B" in md and "**steps** 6 of 10" in md
    assert "| loss | 1 | 0.1667 | 0.1667 |" in md  # first, last, best (lowest)
    assert "| eval/accuracy | 0.1 | 0.4 (step 6) | 0.4 (step 6) |" in md
    assert "| eval/kl | 0.9 | 0.3 (step 6) | 0.3 (step 6) |" in md  # lower is better for KL
    assert "first at step 4" in md and "1 step(s) skipped" in md and "3 prompts" in md
    assert "stopped at step 6 of 10" in md
    assert "![layer_cos](layer_cos.png)" in md
    assert not list((run / "report").glob(".*"))  # atomic writes leave no temp files


def test_report_of_a_tiny_distill_run(tmp_path):
    out = tmp_path / "tiny"
    r = runner.invoke(app, ["distill", "--recipe", str(ROOT / "recipes/tiny-cpu.yaml"), "--steps", "2",
                            "-o", str(out), "rollout.max_new_tokens=8"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["report", str(out), "--output", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    for name in ("loss.png", "layer_cos.png", "response_len.png", "throughput.png", "report.md"):
        assert (tmp_path / "rep" / name).is_file(), name
    assert "builtin:tiny-teacher" in (tmp_path / "rep" / "report.md").read_text()


def test_opd_only_run_has_no_cosine_plot(tmp_path):
    run = _synthetic_run(tmp_path / "opd", opd_only=True)
    names = {p.name for p in write_report(run)["pngs"]}
    assert "layer_cos.png" not in names and "loss.png" in names
    assert plot_metrics(run / "metrics.jsonl", tmp_path / "m.png")  # None cosines are gaps, not a crash


def test_without_matplotlib_the_summary_is_written_and_one_line_says_why(tmp_path, monkeypatch):
    run = _synthetic_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    r = runner.invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    assert "pip install 'minioprd[plot]'" in r.output
    assert [line for line in r.output.splitlines() if line.startswith("note:")] == [f"note: {MATPLOTLIB_MISSING}"]
    assert (run / "report" / "report.md").is_file() and not list((run / "report").glob("*.png"))
    assert plot_metrics(run / "metrics.jsonl", tmp_path / "m.png") is False


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_not_a_run_is_one_line_exit_2(tmp_path, make):
    d = tmp_path / "x"
    if make == "empty":
        d.mkdir()
    r = runner.invoke(app, ["report", str(d)])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error:")
    assert ("does not exist" if make == "missing" else "metrics.jsonl") in r.output
