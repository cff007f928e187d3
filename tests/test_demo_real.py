"""`minioprd demo --real`: every row trains through distill(), is scored on the held-out prompts against the
teacher, and the results are cached and tabulated. Run here on the tiny builtin pair (the real SmolLM2 pair
is the same code with other model names; its figures are in the README)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from minioprd.demo import real as dr
from minioprd.cli import app
from minioprd.data import load_examples
from minioprd.errors import MinioprdError

OPRD, FULL = (f"{dr.REAL_METHODS[m][1]:g}" for m in ("oprd", "opd_full"))
TINY = dict(teacher="builtin:tiny-teacher", student="builtin:tiny-student", steps=2, threads=1)


def test_builtin_chat_splits_are_disjoint():
    train, test = load_examples("builtin:chat"), load_examples("builtin:chat", split="test")
    assert (len(train), len(test)) == (48, 12)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    with pytest.raises(MinioprdError, match="no split 'val'"):
        load_examples("builtin:chat", split="val")


def test_real_rows_train_score_and_resume(tmp_path, monkeypatch):
    res = dr.run_real(tmp_path / "r", methods=("oprd", "opd_full"), **TINY)
    rows = {r["row"]: r for r in res["rows"]}
    assert list(rows) == ["before", f"oprd-lr{OPRD}-seed0-steps2", f"opd_full-lr{FULL}-seed0-steps2", "teacher"]
    assert res["held_out_prompts"] == 12
    for name in ("before", f"oprd-lr{OPRD}-seed0-steps2", f"opd_full-lr{FULL}-seed0-steps2"):
        r = rows[name]
        assert r["ref_kl"] > 0 and r["kl"] >= 0 and 0 <= r["repetition"] <= 1 and len(r["samples"]) == 12
        assert r["tokens"] > 0
    # the teacher's text is the same for every row, so its KL to itself is 0 and trained rows moved it
    assert rows["teacher"]["ref_kl"] == 0.0
    assert rows[f"oprd-lr{OPRD}-seed0-steps2"]["ref_kl"] != rows["before"]["ref_kl"]
    run_dir = tmp_path / "r" / "runs" / f"oprd-lr{OPRD}-seed0-steps2" / "run"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    md = (tmp_path / "r" / "real.md").read_text()
    assert f"| oprd | {OPRD} |" in md and f"| opd_full | {FULL} |" in md and "KL on teacher's text" in md
    assert json.loads((tmp_path / "r" / "real.json").read_text())["rows"][1]["method"] == "oprd"

    # a rerun reuses every finished row: nothing trains again
    import minioprd.distill as distill_mod

    monkeypatch.setattr(distill_mod, "distill", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = dr.run_real(tmp_path / "r", methods=("oprd", "opd_full"), **TINY)
    assert [r["row"] for r in again["rows"]] == list(rows)
    assert again["rows"][1]["ref_kl"] == rows[f"oprd-lr{OPRD}-seed0-steps2"]["ref_kl"]


def test_real_refuses_rows_of_other_models(tmp_path):
    dr.run_real(tmp_path / "r", methods=(), **TINY)
    with pytest.raises(MinioprdError, match="holds rows made with"):
        dr.run_real(tmp_path / "r", methods=(), **{**TINY, "student": "builtin:tiny-teacher"})


def test_real_bad_input():
    with pytest.raises(MinioprdError, match="unknown method"):
        dr.run_real("unused", methods=("sft",), **TINY)
    r = CliRunner().invoke(app, ["demo", "--real", "--compare"])
    assert r.exit_code == 2 and "--compare and --real" in r.stderr
    r = CliRunner().invoke(app, ["demo", "--real", "--lrs", "fast"])
    assert r.exit_code == 2 and "--lrs must be comma-separated numbers" in r.stderr
