"""Data-parallel distill: two real CPU processes (gloo, under accelerate) against one process on the tiny pair.

Same seed and global batch (4 prompts x 2 responses per step): each process rolls out 2 prompts. scale_mse
normalises by its micro-batch's teacher scale, so both runs use rollout.micro_batch=4 (= one process's share):
the one-process run then computes on the same row groups and the adapters must agree to float rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from minioprd.checkpoint import checkpoints, verify
from minioprd.cli import app
from minioprd.parallel import launch_command, row_seeds

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")
ARGS = ["--steps", "3", "train.save_every=1", "train.keep_checkpoints=0", "train.lr=3e-3", "rollout.micro_batch=4"]
TIMING = {"rollout_s", "teacher_s", "update_s", "step_s", "elapsed_s", "tokens_per_s", "processes"}
runner = CliRunner()


def _env() -> dict[str, str]:
    # the children import this checkout, build nothing (the session's MINIOPRD_HOME) and use one thread each
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _two(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`minioprd distill --num-processes 2` (it re-launches itself through accelerate on the CPU)."""
    cmd = [sys.executable, "-m", "minioprd", "distill", "-r", RECIPE, "-o", str(out), *ARGS, *extra,
           "--num-processes", "2"]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)


def _weights(run: Path, sub: str = "adapter") -> dict[str, torch.Tensor]:
    w = load_file(str(run / sub / "adapter_model.safetensors"))
    w.update({f"proj.{k}": v for k, v in load_file(str(run / sub / "projections.safetensors")).items()})
    return w


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert any(k.startswith("proj.") for k in a)  # the projections are compared too
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def _assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ra.keys() - TIMING:
            va, vb = ra[k], rb[k]
            if isinstance(va, (float, list)):
                assert vb == pytest.approx(va, rel=1e-4, abs=1e-6), (ra["step"], k)
            else:
                assert vb == va, (ra["step"], k)


def _cut_to_step(run: Path, step: int) -> None:
    """The run as a crash after checkpoint `step` leaves it: later checkpoints and the results gone."""
    for p in checkpoints(run):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()


@pytest.fixture(autouse=True)
def no_relaunch_in_this_process(monkeypatch):
    """A refusal test that failed to refuse would re-launch through exec, replacing pytest itself."""
    def refuse(*a, **kw):
        raise AssertionError("distill --num-processes tried to launch from inside pytest")
    monkeypatch.setattr("minioprd.parallel.relaunch", refuse)


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *ARGS])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("two") / "run"
    p = _two(out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p


def test_row_seeds_do_not_depend_on_sharding():
    whole = row_seeds(0, 5, 0, 8)
    assert row_seeds(0, 5, 0, 4) + row_seeds(0, 5, 4, 4) == whole
    assert len(set(whole)) == 8 and row_seeds(1, 5, 0, 8) != whole and row_seeds(0, 6, 0, 8) != whole


def test_the_gradient_sum_covers_lora_and_projections(tmp_path):
    """What the step hands to the all-reduce: every LoRA tensor and every width projection (the authors' code
    leaves projections out, so each rank's copy drifts). The two-process test below also fails when they are
    left out: the gradient norm already differs at step 1."""
    from minioprd.config import load_config
    from minioprd.distill import Optimization, RunState
    from minioprd.parallel import Parallel
    from minioprd.prepare import prepare

    s = prepare(load_config(RECIPE, {"train.output_dir": str(tmp_path)}), log=lambda m: None)
    summed: list = []

    class Recording(Parallel):
        def sum_gradients(self, params):
            summed.extend(params)

    s.parallel = Recording(rank=0, world=2)
    opt = Optimization.for_run(s)
    for p in opt.trained:
        p.grad = torch.ones_like(p)
    opt.step(RunState(), 1.0, 1.0)
    ids = {id(p) for p in summed}
    assert len(s.projections) == 2 and all(id(p) in ids for p in s.projections.parameters())
    lora = [p for n, p in s.student.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n, p in s.student.named_parameters() if p.requires_grad)
    assert all(id(p) in ids for p in lora) and len(ids) == len(lora) + 2


def test_two_processes_train_the_one_process_adapter(one, two):
    run2, proc = two
    rows1, rows2 = _metrics(one), _metrics(run2)
    assert [r["step"] for r in rows2] == [1, 2, 3]  # one metrics file, one line per step: no duplicate writes
    assert all(r["processes"] == 2 for r in rows2)  # two ranks really ran (a lone rank would not say 2)
    assert "processes" not in rows1[0]
    _assert_same_metrics(rows1, rows2)  # same rollouts (lengths, distinct ratios), same loss and cosines
    _assert_same_weights(_weights(one), _weights(run2))  # LoRA and projections: gradients summed over both
    assert rows2[-1]["loss"] != rows2[0]["loss"]  # it trained
    for a, b in zip(checkpoints(one), checkpoints(run2)):
        assert a.name == b.name and verify(b) is None
        _assert_same_weights(_weights(one, f"checkpoints/{a.name}"), _weights(run2, f"checkpoints/{b.name}"))
    state = json.loads((checkpoints(run2)[-1] / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["run"]["rollout.prompts_per_step"] == 4
    assert proc.stdout.count("done: 3 steps") == 1  # process 0 speaks for both
    assert not list(run2.rglob("*.tmp*"))


def test_resume_two_processes_on_one(one, two, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two[0], run)
    _cut_to_step(run, 1)
    r = runner.invoke(app, ["distill", "--resume", str(run)])
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.output and "step 1 of 3" in r.output
    _assert_same_weights(_weights(one), _weights(run))
    _assert_same_metrics(_metrics(one), _metrics(run))


def test_resume_one_process_on_two_under_accelerate_launch(one, tmp_path):
    """`accelerate launch -m minioprd distill --resume` directly (the documented multi-GPU command, here on CPU)."""
    run = tmp_path / "run"
    shutil.copytree(one, run)
    _cut_to_step(run, 2)
    cmd = launch_command(2, ["distill", "--resume", str(run)])
    p = subprocess.run(cmd, env={**_env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming from" in p.stdout and "on 2 processes" in p.stdout
    rows = _metrics(run)
    assert [r.get("processes") for r in rows] == [None, None, 2]
    _assert_same_weights(_weights(one), _weights(run))
    _assert_same_metrics(_metrics(one), rows)


@pytest.mark.slow
def test_sigterm_to_the_launcher_leaves_a_whole_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "minioprd", "distill", "-r", RECIPE, "-o", str(out), "--steps", "500",
           "train.save_every=0", "--num-processes", "2"]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 600
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)  # the launcher (this pid after the re-launch) forwards it to both processes
    text, _ = p.communicate(timeout=300)
    saved = checkpoints(out)
    assert len(saved) == 1 and verify(saved[0]) is None, text[-3000:]
    step = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert _metrics(out)[-1]["step"] == step < 500
    assert "stopped by SIGTERM" in text and text.count("stopped by") == 1
    r = runner.invoke(app, ["distill", "--resume", str(out), "--steps", str(step + 1)])
    assert r.exit_code == 0, r.output  # and it resumes, here on one process


@pytest.mark.parametrize("args,words", [
    (["--num-processes", "5"], "5 processes cannot share rollout.prompts_per_step=4"),
    (["--num-processes", "2", "--device", "cuda"], "no CUDA device is visible"),
    (["--num-processes", "2", "--device", "cuda:0"], "model.device=cuda:0 with 2 processes"),
    (["--num-processes", "2", "--teacher-device", "cuda:1"], "model.teacher_device=cuda:1 with 2 processes"),
])
def test_launch_errors_are_one_line_and_write_nothing(tmp_path, args, words):
    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *args])
    assert r.exit_code == 2, r.output
    assert words in r.output and r.output.count("error:") == 1 and "Traceback" not in r.output
    assert not out.exists()


def test_launch_count_must_match_the_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(tmp_path / "run"), "--num-processes", "4"])
    assert r.exit_code == 2 and "--num-processes 4 but this launch has 2 processes" in r.output
    assert not (tmp_path / "run").exists()


def test_checkpoint_from_another_run_is_refused(one, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one, run)
    _cut_to_step(run, 2)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = runner.invoke(app, ["distill", "--resume", str(run), "--prompts-per-step", "8", "--num-processes", "2"])
    assert r.exit_code == 2, r.output
    assert "is from another run (rollout.prompts_per_step 4 there, 8 here)" in r.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written
    r = runner.invoke(app, ["distill", "--resume", str(run), "--seed", "3"])  # one process: the same refusal
    assert r.exit_code == 2 and "train.seed 0 there, 3 here" in r.output
