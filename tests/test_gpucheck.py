"""The GPU check (scripts/gpu_check.sh, minioprd.gpucheck) on the CPU, so it does not rot before a GPU comes:
its dry run and wheelhouse check, every row at toy shapes (`--mode cpu`), budgets, and the report's schema."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minioprd import gpucheck as gc

ROOT = Path(__file__).parents[1]


def _wheelhouse(root: Path, names: list[str], size: int = 1000) -> Path:
    d = root / "whl"
    d.mkdir()
    for n in names:
        with open(d / n, "wb") as f:
            f.truncate(size)  # sparse: only the size matters to the check
    return d


COMPLETE = ["bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "peft-0.21.2-py3-none-any.whl"]


def test_wheelhouse_list_matches_the_files_named():
    assert set(gc.WHEELS) == {n.split("-")[0] for n in COMPLETE}
    assert all(gc.WHEELS[n.split("-")[0]] == n.split("-")[1] for n in COMPLETE)


def test_dry_run_prints_the_plan_and_the_run_invocation(tmp_path):
    wh = _wheelhouse(tmp_path, COMPLETE)
    env = {**os.environ, "MINIOPRD_WHEELHOUSE": str(wh), "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    for phase in gc.PHASES:
        assert f"{phase.name:<14} {phase.budget_s:>4}s" in p.stdout
    assert 'run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)' in p.stdout
    assert "0.0 MiB of 60 MiB" in p.stdout  # the wheelhouse measured against what the device tool carries
    assert not (tmp_path / "out" / "gpu-check.json").exists()  # a dry run runs no row and writes no report


def test_budgets_fit_eight_minutes():
    assert sum(p.budget_s for p in gc.PHASES) <= gc.TOTAL_BUDGET_S < 480
    assert "timeout -k 5 480" in (ROOT / "scripts" / "gpu_check.sh").read_text()


@pytest.mark.parametrize("names, size, expected", [
    (COMPLETE[:1], 1000, "missing peft==0.21.2"),
    ([COMPLETE[0], "peft-0.20.0-py3-none-any.whl"], 1000, "missing peft==0.21.2 (has peft-0.20.0"),
    (["bitsandbytes-0.50.2-py3-none-macosx_14_0_arm64.whl", COMPLETE[1]], 1000, "wrong platform"),
    (COMPLETE, 31 * 2**20, "62.0 MiB, over the 60 MiB"),
])
def test_incomplete_or_oversized_wheelhouse_is_one_line_exit_2(tmp_path, capsys, names, size, expected):
    wh = _wheelhouse(tmp_path, names, size)
    assert gc.main(["--dry-run", "--wheelhouse", str(wh)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "gpu_wheelhouse.sh" in err[0]


def test_unknown_row_or_mode_is_one_line_exit_2(capsys):
    assert gc.main(["--rows", "env,distil_bf16", "--dry-run"]) == 2
    assert gc.main(["--mode", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "distil_bf16" in err[0] and "tpu" in err[1]


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """Every row but gpu_tests (its tests are in this suite already) at toy shapes on the CPU, in-process."""
    out = tmp_path_factory.mktemp("gpucheck")
    rows = tuple(n for n in gc.PHASE_NAMES if n != "gpu_tests")
    return out, gc.run_check(out, mode="cpu", phases=rows, isolate=False, log=lambda m: None)


def test_cpu_mode_runs_every_row_and_follows_the_schema(cpu_check):
    out, doc = cpu_check
    assert gc.validate(doc) == []
    assert json.loads((out / "gpu-check.json").read_text()) == json.loads(json.dumps(doc))
    by = {r["name"]: r for r in doc["rows"]}
    assert [r["name"] for r in doc["rows"]] == [n for n in gc.PHASE_NAMES if n != "gpu_tests"]
    assert {r["status"] for r in doc["rows"]} == {"pass"}, [(r["name"], r["reason"]) for r in doc["rows"]]
    md = (out / "gpu-check.md").read_text()
    assert all(f"| {n} | **pass** |" in md for n in by)
    assert doc["environment"]["torch"] == torch.__version__ and doc["environment"]["cuda_available"] is False


def test_cpu_mode_distill_rows_measure_memory_and_split_the_step(cpu_check):
    _, doc = cpu_check
    by = {r["name"]: r["figures"] for r in doc["rows"]}
    for dtype in ("fp16", "bf16"):
        f = by[f"distill_{dtype}"]
        assert f["steps"] == 3 and f["dtype"] == dtype
        assert f["teacher_quant"] == ("4bit" if doc["bitsandbytes"] else "none")
        assert f["peak_measured_mib"] > 0 and f["plan_estimate_mib"] > 0
        assert f["plan_error_pct"] == pytest.approx(100 * (f["plan_estimate_mib"] / f["peak_measured_mib"] - 1))
        assert f["s_per_step"] == pytest.approx(f["rollout_s"] + f["teacher_s"] + f["update_s"], rel=1e-6)
        assert min(f["rollout_s"], f["teacher_s"], f["update_s"]) > 0
    assert by["distill_fp16"]["loss_scale"] == [2.0**16] * 3 and by["distill_bf16"]["loss_scale"] == [None] * 3


def test_cpu_mode_bench_and_merge_rows_carry_their_figures(cpu_check):
    _, doc = cpu_check
    by = {r["name"]: r["figures"] for r in doc["rows"]}
    u = by["bench_update"]
    assert u["memory_ratio"] == pytest.approx(u["opd_topk_peak_mb"] / max(u["oprd_peak_mb"], 1e-9))
    assert u["work_ratio"] > 1  # top-k OPD adds the LM head's work: counted, not timed
    r = by["bench_rollout"]
    assert r["vs_bare/bare_generate"] == 1.0 and r["tokens_per_s/plain"] > 0
    assert {"vs_bare/plain", "vs_bare/shared", "vs_bare/packed", "vs_bare/static"} <= set(r)
    assert r["same_tokens/static"] == 1.0 and r["fraction_of_bound/plain"] > 0
    m = by["merge_qlora"]
    if doc["bitsandbytes"]:
        assert m["verified"] is True and m["dequantized"] is True and m["max_abs_diff"] <= m["tolerance"]
        assert m["nf4_device_vs_cpu_max_diff"] == 0.0  # both quantized on the CPU here


def test_rows_are_stopped_at_their_budget_and_late_rows_not_started(tmp_path):
    t0 = time.time()
    doc = gc.run_check(tmp_path, mode="cpu", phases=("env", "distill_fp16"), isolate=True, total_budget=10,
                       budgets={"env": 0.3}, log=lambda m: None)
    assert time.time() - t0 < 10
    env, late = doc["rows"]
    assert env["status"] == "fail" and env["reason"].startswith("timed out") and env["seconds"] < 5
    assert late["status"] == "not_run" and late["reason"].startswith("out of time")
    assert gc.validate(doc) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")
def test_gpu_mode_without_cuda_fails_env_and_skips_the_rest(tmp_path, capsys):
    doc = gc.run_check(tmp_path, mode="gpu", phases=("env", "distill_bf16", "merge_qlora"), isolate=False,
                       bnb=False, log=lambda m: None)
    env, distill, merge = doc["rows"]
    assert env["status"] == "fail" and "no CUDA device" in env["reason"]
    assert distill["status"] == merge["status"] == "not_run" and "no CUDA" in distill["reason"]
    assert doc["summary"] == {"pass": 0, "fail": 1, "not_run": 2} and gc.validate(doc) == []
    assert gc.main(["--rows", "env", "--out", str(tmp_path / "cli")]) == 1  # a failing row: exit 1
    assert "| env | **fail** |" in capsys.readouterr().out


def test_validate_names_what_is_broken(cpu_check):
    _, good = cpu_check
    cases = {
        "status 'ok'": lambda d: d["rows"][0].update(status="ok"),
        "a passing row has a failure reason": lambda d: d["rows"][0].update(reason="x"),
        "a fail row must say why": lambda d: d["rows"][0].update(status="fail"),
        "does not count the rows": lambda d: d["summary"].update(fail=3),
        "needs its seconds": lambda d: d["rows"][1].update(seconds=None),
        "unknown name": lambda d: d["rows"][1].update(name="bench_everything"),
        "schema is 2": lambda d: d.update(schema=2),
        "rows: missing": lambda d: d.pop("rows"),
    }
    for expected, breaks in cases.items():
        doc = copy.deepcopy(good)
        breaks(doc)
        problems = gc.validate(doc)
        assert any(expected in p for p in problems), (expected, problems)
