"""fp16 loss scaling (train.fp16_loss_scale): a student computing in fp16 (a T4) keeps its small gradients.

At real shapes OPRD's per-element gradient is ~1/(tokens x width x layers) of the loss, below fp16's smallest
subnormal; the tiny CPU models reach that regime with a small loss.coef. fp16 runs on the CPU here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from minioprd.cli import app

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")
FP16 = ["model.dtype=fp16", "model.teacher_quant=none"]
runner = CliRunner()


def _run(out: Path, *args: str) -> list[dict]:
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *FP16, *args])
    assert r.exit_code == 0, r.output
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _lora_b(out: Path) -> list[torch.Tensor]:
    return [v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]


def _moved(out: Path) -> float:
    """Fraction of LoRA B entries (zero at the start) that any update moved."""
    b = _lora_b(out)
    return sum(int((x != 0).sum()) for x in b) / sum(x.numel() for x in b)


def test_small_gradients_survive_fp16_only_with_loss_scaling(tmp_path):
    off = _run(tmp_path / "off", "--steps", "3", "loss.coef=1e-6", "train.fp16_loss_scale=false")
    on = _run(tmp_path / "on", "--steps", "3", "loss.coef=1e-6")
    assert _moved(tmp_path / "off") < 0.5  # most gradients flushed to zero: those weights never moved
    assert _moved(tmp_path / "on") == 1.0
    assert all("loss_scale" not in r for r in off) and [r["loss_scale"] for r in on] == [2.0**16] * 3
    # the figures are of the unscaled loss: the same rollouts give the same first loss either way
    assert on[0]["loss"] == off[0]["loss"]


def test_overflow_halves_the_scale_without_stopping_the_run(tmp_path):
    rows = _run(tmp_path / "run", "--steps", "8", "loss.coef=100")
    scales = [r["loss_scale"] for r in rows]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    n = summary["fp16_overflow_steps"]
    assert n >= 1 and summary["nonfinite_steps"] == 0  # overflows are skipped, not counted as bad steps
    # each step's scale is the last one's, or half of it after an overflow (which steps overflow depends on the
    # rollouts); an overflow in the last step halves a scale no line shows
    steps = list(zip(scales, scales[1:]))
    assert scales[0] == 2.0**16 and all(b in (a, a / 2) for a, b in steps)
    assert sum(b == a / 2 for a, b in steps) in (n - 1, n)
    assert _moved(tmp_path / "run") == 1.0


KILL_AFTER_STEP = r"""
import os, signal, sys
import minioprd.distill as d
n, orig = int(sys.argv[1]), d.append_jsonl
def patched(path, rec):
    orig(path, rec)
    if rec.get("step") == n:
        os.kill(os.getpid(), signal.SIGKILL)
d.append_jsonl = patched
from minioprd.cli import main
sys.argv = ["minioprd"] + sys.argv[2:]
main()
"""


def test_resume_restores_the_loss_scale(tmp_path):
    args = ["--steps", "6", "loss.coef=100", "train.save_every=2", "train.keep_checkpoints=0"]
    reference = _run(tmp_path / "ref", *args)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_STEP, "5", "distill", "-r", RECIPE, "-o", str(out), *FP16,
                        *args], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == -signal.SIGKILL
    r = runner.invoke(app, ["distill", "--resume", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss_scale"] for x in rows] == [x["loss_scale"] for x in reference]
    assert [x["loss"] for x in rows] == [x["loss"] for x in reference]
    assert all(torch.equal(a, b) for a, b in zip(_lora_b(out), _lora_b(tmp_path / "ref")))
