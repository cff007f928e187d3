"""`minioprd demo`: the task and its grader are exact, the pairs show a teacher-student gap, and the demo and
the comparison run end to end in a reduced configuration and write well-formed reports."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from minioprd.demo import compare, runs, task
from minioprd.demo import pairs as demo_pairs
from minioprd.cli import app
from minioprd.data import Example, arithmetic_solution
from minioprd.errors import MinioprdError
from minioprd.grading import grade

# A reduced build: seconds, not minutes. The student stops after 30 steps, the teacher is the same run 90
# steps further; the wide teacher only has to exist (its shape is what the projection path needs).
SMALL = demo_pairs.PairRecipe(eval_every=30, student_acc=1.0, student_max_steps=30, teacher_steps=90, wide_steps=5)


@pytest.fixture(scope="module")
def splits():
    return task.task_splits()


@pytest.fixture(scope="module")
def pairs():
    return demo_pairs.ensure_pairs(SMALL)


# --------------------------------------------------------------------------------------------- task + grader


def test_splits_are_disjoint_and_sized(splits):
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 2000, "val": 200, "test": 200}
    prompts = {k: {e.prompt for e in v} for k, v in splits.items()}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    assert task.task_splits()["val"][0].prompt == splits["val"][0].prompt  # deterministic


def test_every_reference_solution_is_correct_and_grades_correct(splits):
    for ex in [e for v in splits.values() for e in v]:
        a, b, op = ex.meta["a"], ex.meta["b"], ex.meta["op"]
        assert ex.answer == str(a + b if op == "+" else a - b)
        sol = arithmetic_solution(ex)
        # every column step is true arithmetic: x+y(+c)=z or x(-c)-y=z
        for step in re.findall(r"(\d+(?:[+-]\d+)+)=(\d+)", sol):
            assert eval(step[0]) == int(step[1]), (ex.prompt, sol)  # noqa: S307 - digits and +/- only
        assert grade(sol, ex.answer).correct, (ex.prompt, sol)


def test_wrong_answers_grade_wrong(splits):
    for ex in splits["test"][:50]:
        sol = arithmetic_solution(ex)
        wrong = str(int(ex.answer) + 1)
        assert not grade(sol.replace(f"\\boxed{{{ex.answer}}}", f"\\boxed{{{wrong}}}"), ex.answer).correct
        assert not grade(sol.replace(f"\\boxed{{{ex.answer}}}", ""), ex.answer).correct  # no final answer
    ex = Example("What is 47+38?", "85", {"a": 47, "b": 38, "op": "+"})
    assert arithmetic_solution(ex) == "7+8=15, carry 1. 4+3+1=8. \\boxed{85}"
    assert not grade("7+8=15, carry 1. 4+3+1=8. \\boxed{58}", "85").correct
    assert not grade("\\boxed{85", "85").correct  # unbalanced: no usable answer


def test_task_eval_scores_reference_answers(pairs, splits):
    """A model that answers with the reference solution scores 100%; the evaluator reads real generations."""
    tok = demo_pairs.load_tokenizer(pairs)
    ev = task.TestSet(tok, splits["test"][:8])
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(pairs.student)
    out = ev(student, AutoModelForCausalLM.from_pretrained(pairs.teacher("shared")), [(1, 1), (2, 2)])
    assert 0.0 <= out["acc"] <= 1.0 and out["kl"] >= 0.0 and -1.0 <= out["cos"] <= 1.0
    same = ev(student, student, [(1, 1), (2, 2)])
    assert same["kl"] == pytest.approx(0.0, abs=1e-5) and same["cos"] == pytest.approx(1.0, abs=1e-4)


# --------------------------------------------------------------------------------------------- pairs


def _token_accuracy(model, tok, examples) -> float:
    """Teacher-forced next-token accuracy on the reference solutions (a smooth stand-in for task accuracy)."""
    from minioprd.demo.sft import CEData, ce_batch

    data = CEData.from_texts(tok, task.encode_prompts(tok, examples), [arithmetic_solution(e) for e in examples])
    batch = ce_batch(data.prompts, data.responses, tok.pad_token_id)
    with torch.no_grad():
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].argmax(-1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    return float((pred[keep] == labels[keep]).float().mean())


def test_reduced_pair_has_a_gap_and_is_cached(pairs, splits):
    from transformers import AutoModelForCausalLM

    meta = pairs.meta
    assert meta["student"]["steps"] == 30 and meta["teacher"]["steps"] == 120
    assert meta["built_with"]["torch"] == torch.__version__  # a report can tell which build made the pairs
    assert meta["built_with"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert meta["teacher"]["val_acc"] >= meta["student"]["val_acc"]
    tok = demo_pairs.load_tokenizer(pairs)
    load = AutoModelForCausalLM.from_pretrained
    s_acc = _token_accuracy(load(pairs.student), tok, splits["val"][:64])
    t_acc = _token_accuracy(load(pairs.teacher("shared")), tok, splits["val"][:64])
    print(f"teacher-forced token accuracy: student {s_acc:.3f}, teacher {t_acc:.3f}")
    assert t_acc > s_acc + 0.1, (s_acc, t_acc)
    wide = load(pairs.teacher("wide"))
    assert wide.config.hidden_size > 64 and wide.config.num_hidden_layers > 2
    assert demo_pairs.ensure_pairs(SMALL).root == pairs.root  # second call loads the cache
    assert pairs.root.name == SMALL.key() and (pairs.root / "pairs.json").is_file()
    assert not [p for p in pairs.root.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.slow
def test_default_pair_student_and_teacher_accuracy():
    """The shipped recipe: student ~25-40%, both teachers far above (about 4 minutes of CPU)."""
    meta = demo_pairs.ensure_pairs().meta
    assert 0.2 <= meta["student"]["val_acc"] <= 0.45
    assert meta["teacher"]["val_acc"] >= 0.85 and meta["wide_teacher"]["val_acc"] >= 0.8


# --------------------------------------------------------------------------------------------- demo + compare


def test_demo_reduced_writes_report_and_plot(pairs, tmp_path):
    out = tmp_path / "demo"
    report = runs.run_demo(out, steps=2, eval_every=2, n_test=8, recipe=SMALL)
    data = json.loads((out / "report.json").read_text())
    assert [r["pairing"] for r in data["rows"]] == ["shared", "wide"]
    for row in data["rows"]:
        for key in ("teacher_acc", "student_before_acc", "student_after_acc", "kl_before", "kl_after", "curve"):
            assert key in row, key
        assert 0.0 <= row["student_after_acc"] <= 1.0 and row["kl_after"] >= 0.0
        assert [c["step"] for c in row["curve"]] == [0, 2]
        assert row["curve"][0]["acc"] == pytest.approx(row["student_before_acc"])  # same student, same problems
        if row["teacher_acc"] > row["student_before_acc"]:
            want = (row["student_after_acc"] - row["student_before_acc"]) / (row["teacher_acc"]
                                                                             - row["student_before_acc"])
            assert row["gap_closed"] == pytest.approx(want)
    assert data["rows"][0]["cos_before"] is not None  # same width: the cosine needs no projection
    assert (out / "shared" / "adapter" / "adapter_config.json").is_file()
    # the wide row runs the default loss.objective=auto, which picks opd_full there (no OPRD term, no projections)
    assert [(r["method"], r["objective"]) for r in data["rows"]] == [("oprd", "oprd"), ("auto", "opd_full")]
    assert not (out / "wide" / "adapter" / "projections.safetensors").exists()
    pytest.importorskip("matplotlib")
    assert report["plot"] and (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_reduced_picks_lr_on_validation_and_resumes(pairs, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    kw = dict(seeds=2, steps=2, eval_every=2, n_test=8, recipe=SMALL, methods=("oprd", "sft_teacher"),
              pairings=("shared",), knobs=("oprd/last_layer",), lrs=(1e-3, 1e-2))
    res = compare.run_compare(out, **kw)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"oprd", "sft_teacher", "oprd/last_layer"}
    for name in ("oprd", "sft_teacher"):
        r = rows[name]
        grid = r["lr_grid_val_acc"]
        assert set(grid) == {"0.001", "0.01"} and r["lr"] == max((1e-3, 1e-2), key=lambda x: (grid[f"{x:g}"], -x))
        assert r["seeds"] == [0, 1] and r["acc_std"] is not None and "curve_spread" in r
    assert rows["oprd/last_layer"]["lr"] == rows["oprd"]["lr"]  # knob rows run at OPRD's rate
    md = (out / "compare.md").read_text()
    assert "| **oprd** |" in md and "| *oprd/last_layer* |" in md and "Validation accuracy" in md
    assert json.loads((out / "compare.json").read_text())["rows"][0]["method"] == "oprd"
    # a second call reuses every finished run
    monkeypatch.setattr(compare, "run_one", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    again = compare.run_compare(out, **kw)
    assert [r["acc_mean"] for r in again["rows"]] == [r["acc_mean"] for r in res["rows"]]


def test_compare_bridge_rows_fit_one_bridge_and_train_in_its_subspace(pairs, tmp_path, monkeypatch):
    import minioprd.bridge as b

    out = tmp_path / "cmp"
    builds = []
    real = b.build_bridge
    monkeypatch.setattr(b, "build_bridge", lambda *a, **k: builds.append(a) or real(*a, **{**k, "prompts": 16}))
    res = compare.run_compare(out, seeds=1, steps=2, eval_every=2, n_test=8, recipe=SMALL, pairings=("shared", "wide"),
                        methods=("oprd_bridge", "opd_full+oprd_bridge"), knobs=(), lrs=(1e-3,))
    # wide only (the shared-origin pair needs no bridge); one bridge for both rows, of the wide teacher
    assert [(r["pairing"], r["method"]) for r in res["rows"]] == [("wide", "oprd_bridge"),
                                                                   ("wide", "opd_full+oprd_bridge")]
    assert len(builds) == 1 and builds[0][0] == str(pairs.teacher("wide"))
    meta = json.loads((out / "bridge-wide" / "bridge.json").read_text())
    assert meta["rank"] == runs.BRIDGE_RANK
    for run in (out / "runs" / "wide").iterdir():
        cfg = (next(run.iterdir()) / "config.yaml").read_text()
        assert f"bridge: {out / 'bridge-wide'}" in cfg and "kind: normalized_mse" in cfg
        rows = [json.loads(l) for l in (next(run.iterdir()) / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(r["loss"] > 0 for r in rows if "loss" in r)


def test_cli_demo_rejects_bad_options(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["demo", "--compare", "--methods", "opd_magic", "-o", str(tmp_path / "x"),
                                 "--pairings", "shared"])
    assert result.exit_code == 2 and "unknown method" in result.output
    result = runner.invoke(app, ["demo", "--n-test", "500"])
    assert result.exit_code == 2 and "--n-test" in result.output
    result = runner.invoke(app, ["demo", "--methods", "oprd,opd_full"])
    assert result.exit_code == 2 and "one method per pairing" in result.output
    with pytest.raises(MinioprdError, match="sft_teacher|demo distills"):
        runs.run_demo(tmp_path / "y", methods={"shared": "sft_teacher"}, pairings=("shared",))


def test_cli_demo_runs_reduced(pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "PairRecipe", lambda: SMALL)  # the CLI builds the default recipe: use the small one
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["demo", "-o", str(out), "--steps", "1", "--n-test", "4", "--pairings",
                                      "shared,wide"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "auto → opd_full" in result.output  # the table shows the objective auto picked
    assert "gap" in result.output and "report.json" in result.output and (out / "report.json").is_file()
    assert json.loads((out / "report.json").read_text())["rows"][0]["steps"] == 1
