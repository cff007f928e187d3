"""Reliability: exact resume after SIGKILL (also mid-checkpoint), SIGINT, NaN, OOM, full disk, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from minioprd.cli import app

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")
ARGS = ["--steps", "8", "train.save_every=2", "train.keep_checkpoints=0", "train.lr=3e-3"]
TIMING = {"rollout_s", "teacher_s", "update_s", "step_s", "elapsed_s", "tokens_per_s"}
runner = CliRunner()

# Runs distill in a child that SIGKILLs itself at a chosen point: after writing metrics line N, or while
# writing checkpoint number N (between its files, before the directory is renamed into place).
KILLER = r"""
import os, signal, sys
import minioprd.checkpoint as ck, minioprd.distill as d
mode, n = sys.argv[1], int(sys.argv[2])
if mode == "after_step":
    orig = d.append_jsonl
    def patched(path, rec):
        orig(path, rec)
        if rec.get("step") == n:
            os.kill(os.getpid(), signal.SIGKILL)
    d.append_jsonl = patched
else:
    orig_sha, calls = ck._sha256, {"n": 0}
    def patched_sha(path):
        if path.name == "adapter_model.safetensors":
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return orig_sha(path)
    ck._sha256 = patched_sha
from minioprd.cli import main
sys.argv = ["minioprd"] + sys.argv[3:]
main()
"""


def _run_child(out: Path, mode: str, n: int) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", KILLER, mode, str(n), "distill", "-r", RECIPE, "-o", str(out), *ARGS],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    return p.returncode


def _weights(run: Path) -> dict[str, torch.Tensor]:
    w = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    w.update({f"proj.{k}": v for k, v in load_file(str(run / "adapter" / "projections.safetensors")).items()})
    return w


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *ARGS])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("mode,n", [("after_step", 1), ("after_step", 5), ("after_step", 6),
                                    ("mid_checkpoint", 2), ("mid_checkpoint", 3)])
def test_sigkill_then_resume_matches_uninterrupted_run(reference, tmp_path, mode, n):
    out = tmp_path / "run"
    assert _run_child(out, mode, n) == -signal.SIGKILL
    assert not (out / "adapter").exists()
    leftovers = [p.name for p in (out / "checkpoints").iterdir()] if (out / "checkpoints").exists() else []
    assert all(name.startswith("step-") or name.startswith(".") for name in leftovers)
    r = runner.invoke(app, ["distill", "--resume", str(out)])
    if mode == "after_step" and n == 1:  # killed before the first checkpoint: nothing to resume from
        assert r.exit_code == 2 and "no usable checkpoint" in r.stderr
        r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *ARGS, "--force"])
    assert r.exit_code == 0, r.output
    ref, got = _weights(reference), _weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bitwise
    assert _metrics(out) == _metrics(reference)


def test_rerunning_the_same_command_resumes_and_a_finished_run_is_kept(reference, tmp_path):
    out = tmp_path / "run"
    assert _run_child(out, "after_step", 5) == -signal.SIGKILL
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *ARGS])  # same command again
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.stdout and "step-000004" in r.stdout
    before = (out / "summary.json").read_bytes()
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *ARGS])
    assert r.exit_code == 0 and "already complete" in r.stdout
    assert (out / "summary.json").read_bytes() == before


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    out = tmp_path / "run"
    assert _run_child(out, "after_step", 7) == -signal.SIGKILL
    newest = out / "checkpoints" / "step-000006" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated by a bad disk
    r = runner.invoke(app, ["distill", "--resume", str(out)])
    assert r.exit_code == 0, r.output
    assert "step-000006 is unusable" in r.output and "step-000004" in r.stdout


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "minioprd.cli", "distill", "-r", RECIPE, "-o", str(out),
                          "--steps", "400", "train.save_every=0"], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                          and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "stopped by SIGINT" in err and f"--resume {out}" in err
    ckpts = sorted((out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "checksums.json").is_file()
    step = int(ckpts[0].name.split("-")[1])
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step


def _api_run(tmp_path, monkeypatch_target=None, **over):
    from minioprd.config import load_config
    from minioprd.distill import distill

    cfg = load_config(RECIPE, {"train.output_dir": str(tmp_path / "run"), "train.steps": 6, **over})
    return distill(cfg)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import minioprd.distill as d

    orig, bad = d.update_step, {"steps": {2}}
    calls = {"n": 0}

    def patched(s, ro, *scale):
        calls["n"] += 1
        fig = orig(s, ro, *scale)
        if calls["n"] in bad["steps"]:
            fig["loss"] = float("nan")
        return fig

    monkeypatch.setattr(d, "update_step", patched)
    summary = _api_run(tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["nonfinite_steps"] == 1 and rows[1]["nonfinite_steps"] == 1 and rows[0]["nonfinite_steps"] == 0

    calls["n"], bad["steps"] = 0, {3, 4, 5}
    from minioprd.errors import MinioprdError

    with pytest.raises(MinioprdError, match="not finite for 3 steps in a row") as e:
        _api_run(tmp_path / "b")
    ck = tmp_path / "b" / "run" / "checkpoints" / "step-000005"
    assert ck.is_dir() and "step-000005" in str(e.value)
    # the saved state is the last good one: steps 3-5 were skipped, so it equals a 2-step run's weights
    calls["n"], bad["steps"] = 0, set()
    from minioprd.config import load_config
    from minioprd.distill import distill

    two = tmp_path / "two"
    distill(load_config(RECIPE, {"train.output_dir": str(two), "train.steps": 6, "train.save_every": 2}))
    a = load_file(str(ck / "adapter_model.safetensors"))
    b = load_file(str(two / "checkpoints" / "step-000002" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_out_of_memory_keeps_a_checkpoint_and_names_fixes(tmp_path, monkeypatch):
    import minioprd.distill as d

    orig = d.train_step

    def patched(s, opt, state, step):
        if step == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return orig(s, opt, state, step)

    monkeypatch.setattr(d, "train_step", patched)
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(tmp_path / "run"), "--steps", "6"])
    assert r.exit_code == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "out of GPU memory at step 3" in lines[0]
    for fix in ("max_new_tokens", "prompts_per_step", "gradient_checkpointing", "last_k", "student_quant=4bit"):
        assert fix in lines[0]
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "checksums.json").is_file()


def test_full_disk_keeps_earlier_files(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--steps", "2"])
    assert r.exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    import minioprd.files as files

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--steps", "2", "--force"])
    assert r.exit_code == 2
    assert "No space left on device" in r.stderr and "disk full" in r.stderr
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        before[out / "adapter" / "adapter_model.safetensors"]
