"""`distill` with an OPRD-Bridge and with a teacher that has another tokenizer (issue 7 integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from minioprd.cli import app

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml")
runner = CliRunner()


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    from test_cross_tokenizer import other_tokenizer

    from minioprd.builtin.tiny import build_model

    tok = other_tokenizer()
    teacher = build_model("tiny-teacher", len(tok), seed=5)
    teacher.config.eos_token_id = teacher.generation_config.eos_token_id = tok.eos_token_id
    teacher.config.pad_token_id = teacher.generation_config.pad_token_id = tok.pad_token_id
    d = tmp_path_factory.mktemp("other") / "teacher"
    teacher.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _fit_bridge(out: Path, **sizes: int) -> Path:
    """`minioprd bridge` for the tiny pair on builtin:arithmetic, with `sizes` as flags."""
    flags = [x for k, v in sizes.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    r = runner.invoke(app, ["bridge", "--teacher", "builtin:tiny-teacher", "--student", "builtin:tiny-student",
                            "--dataset", "builtin:arithmetic", "-o", str(out), "--teacher-quant", "none", "--device",
                            "cpu", *flags])
    assert r.exit_code == 0, r.output
    return out


def test_distill_in_a_bridge_subspace(tmp_path, other_teacher):
    b = _fit_bridge(tmp_path / "bridge", rank=4, prompts=16, max_new_tokens=8, epochs=2)
    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--steps", "4", f"loss.bridge={b}",
                            "loss.kind=normalized_mse", "loss.coef=10", "model.teacher_quant=none",
                            "train.eval_every=2", "eval.holdout=6", "eval.max_new_tokens=8"])
    assert r.exit_code == 0, r.output
    assert "bridge:" in r.stdout and "r=4" in r.stdout
    rows = _rows(out)
    steps = [x for x in rows if "loss" in x]  # (step 0's line holds only the eval before training)
    assert len(steps) == 4 and all(x["loss"] > 0 for x in steps) and len(steps[0]["layer_cos"]) == 2
    # widths 64 vs 128 and no projections: the in-loop eval compares in the bridge's subspace
    assert [x for x in rows if "eval/cos_mean" in x and "eval/kl" in x]
    r = runner.invoke(app, ["eval", "--teacher", "builtin:tiny-teacher", "--adapter", str(out), "-d",
                            "builtin:arithmetic", "--max-problems", "3", "--max-new-tokens", "6", "--greedy",
                            "--teacher-quant", "none", "--device", "cpu", "-o", str(tmp_path / "align")],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "align" / "alignment.json").read_text())["report"]
    assert rep["settings"]["bridge_rank"] == 4 and len(rep["layer_cos"]) == 2 and "bridge subspace" in r.stdout
    # against another teacher the run's bridge means nothing: one line, exit 2, nothing written
    r = runner.invoke(app, ["eval", "--teacher", str(other_teacher), "--adapter", str(out), "-d", "builtin:arithmetic",
                            "--max-problems", "3", "--teacher-quant", "none", "--device", "cpu", "-o",
                            str(tmp_path / "align2")])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "was fitted for teacher" in lines[0]
    assert not (tmp_path / "align2" / "alignment.json").exists()
    meta = json.loads((out / "adapter" / "minioprd.json").read_text())
    assert meta["bridge"]["rank"] == 4 and meta["projections"] is False
    assert (out / "adapter" / "bridge" / "bridge.safetensors").is_file()
    assert not (out / "adapter" / "projections.safetensors").exists()


def test_bridge_for_other_models_is_refused(tmp_path, other_teacher):
    b = _fit_bridge(tmp_path / "bridge", rank=2, prompts=8, max_new_tokens=6, epochs=1)
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(tmp_path / "run"), "--teacher", str(other_teacher),
                            f"loss.bridge={b}", "model.teacher_quant=none"])
    assert r.exit_code == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "bridge" in lines[0].lower()


def test_teacher_with_another_tokenizer_reads_the_text(tmp_path, other_teacher):
    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--teacher", str(other_teacher),
                            "--steps", "6", "model.teacher_quant=none", "train.lr=3e-3", "loss.align=exact"])
    assert r.exit_code == 0, r.output
    assert "tokenizers differ" in r.stdout
    rows = _rows(out)
    assert len(rows) == 6 and all(x["loss"] > 0 for x in rows)
    assert sum(x["loss"] for x in rows[-2:]) < sum(x["loss"] for x in rows[:2])
    meta = json.loads((out / "adapter" / "minioprd.json").read_text())
    assert meta["same_tokenizer"] is False


def test_output_space_objective_needs_a_shared_vocabulary(tmp_path, other_teacher):
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(tmp_path / "run"), "--teacher", str(other_teacher),
                            "loss.objective=opd_full", "model.teacher_quant=none"])
    assert r.exit_code == 2 and "needs a shared vocabulary" in r.stderr


def test_bridge_and_distill_across_widths_depths_and_tokenizers(tmp_path, other_teacher):
    """Tiny student (2 x 64) and a teacher of 4 x 128 with another tokenizer: bridge, then distill in it."""
    b = tmp_path / "bridge"
    r = runner.invoke(app, ["bridge", "--teacher", str(other_teacher), "--student", "builtin:tiny-student",
                            "--dataset", "builtin:arithmetic", "-o", str(b), "--rank", "4", "--prompts", "12",
                            "--max-new-tokens", "8", "--epochs", "2", "--teacher-quant", "none", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--teacher", str(other_teacher), "--steps", "4",
                            f"loss.bridge={b}", "loss.kind=normalized_mse", "loss.coef=10", "model.teacher_quant=none",
                            "train.lr=3e-3"])
    assert r.exit_code == 0, r.output
    assert "tokenizers differ" in r.stdout and "bridge:" in r.stdout
    rows = _rows(out)
    assert len(rows) == 4 and all(x["loss"] > 0 for x in rows)
    meta = json.loads((out / "adapter" / "minioprd.json").read_text())
    assert meta["same_tokenizer"] is False and meta["bridge"]["rank"] == 4


def test_eval_alignment_and_in_loop_eval_with_another_tokenizer(tmp_path, other_teacher):
    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--teacher", str(other_teacher), "--steps", "4",
                            "model.teacher_quant=none", "train.eval_every=2", "eval.holdout=6",
                            "eval.max_new_tokens=8"])
    assert r.exit_code == 0, r.output
    evals = [x for x in _rows(out) if "eval/cos_mean" in x]
    assert evals and all("eval/kl" not in x and 0.5 < x["eval/aligned_frac"] <= 1 for x in evals)
    assert (out / "best").is_dir()  # auto picks the cosine when there is neither accuracy nor KL
    r = runner.invoke(app, ["eval", "--teacher", str(other_teacher), "--adapter", str(out), "-d", "builtin:arithmetic",
                            "--max-problems", "4", "--max-new-tokens", "8", "--greedy", "--teacher-quant", "none",
                            "--device", "cpu", "-o", str(tmp_path / "align")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "align" / "alignment.json").read_text())["report"]
    assert rep["kl"] is None and 0.5 < rep["aligned_frac"] <= 1 and 0 < rep["exact_frac"] <= rep["aligned_frac"]
    assert len(rep["layer_cos"]) == len(rep["pairs"]) and all(-1 <= c <= 1 for c in rep["layer_cos"])
    assert "tokenizers differ" in r.stdout and "aligned" in r.stdout
