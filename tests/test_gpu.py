"""GPU smoke tests (`pytest -m gpu`): the paths the CPU suite cannot reach, on tiny models in seconds.

Skipped without CUDA; `scripts/gpu_check.sh` runs them first on a GPU machine. MINIOPRD_TEST_DEVICE=cpu runs the
same tests on the CPU, which checks their logic here (fp16 runs on the CPU too, slowly).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from minioprd.cli import app

DEVICE = os.environ.get("MINIOPRD_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                 reason="needs a CUDA device")]
RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml")
runner = CliRunner()


def _run(out: Path, *args: str) -> list[dict]:
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), "--device", DEVICE, "train.threads=1", *args])
    assert r.exit_code == 0, r.output
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _moved(out: Path) -> float:
    """Fraction of LoRA B entries (zero at the start) that any update moved."""
    b = [v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    return sum(int((x != 0).sum()) for x in b) / sum(x.numel() for x in b)


def test_fp16_loss_scaling_keeps_small_gradients(tmp_path):
    """The T4 path: fp16 student, loss scaled for backward. With a tiny loss.coef the unscaled gradients flush
    to zero in fp16 and most LoRA weights never move; scaled, all of them do."""
    fp16 = ["model.dtype=fp16", "model.teacher_quant=none", "--steps", "3", "loss.coef=1e-6"]
    off = _run(tmp_path / "off", *fp16, "train.fp16_loss_scale=false")
    on = _run(tmp_path / "on", *fp16)
    assert _moved(tmp_path / "off") < 0.5
    assert _moved(tmp_path / "on") == 1.0
    assert [r["loss_scale"] for r in on] == [2.0**16] * 3 and all("loss_scale" not in r for r in off)
    assert all(r["loss"] == r["loss"] and r["nonfinite_steps"] == 0 for r in on)


def test_fp16_overflow_halves_the_scale(tmp_path):
    rows = _run(tmp_path / "run", "model.dtype=fp16", "model.teacher_quant=none", "--steps", "6", "loss.coef=100")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    n = summary["fp16_overflow_steps"]
    assert n >= 1 and summary["nonfinite_steps"] == 0
    assert [r["loss_scale"] for r in rows][:n + 1] == [2.0**16 / 2**i for i in range(n + 1)]
    assert _moved(tmp_path / "run") == 1.0


def _other_device() -> str:
    """A second card where there is one (Kaggle 2xT4), else the CPU: the teacher away from the student."""
    if DEVICE.startswith("cuda") and torch.cuda.device_count() > 1:
        return "cuda:1"
    return "cpu"


def test_teacher_device_puts_the_teacher_apart(tmp_path):
    from minioprd.config import load_config
    from minioprd.distill import distill, prepare

    other = _other_device()
    cfg = load_config(RECIPE, {"model.device": DEVICE, "model.teacher_device": other, "model.teacher_quant": "none",
                               "train.steps": 3, "train.lr": 1e-2, "train.threads": 1,
                               "train.output_dir": str(tmp_path / "run")})
    s = prepare(cfg, log=lambda m: None)
    assert {p.device.type for p in s.teacher.parameters()} == {torch.device(other).type}
    assert {p.device for p in s.student.parameters()} == {torch.device(DEVICE if DEVICE != "cuda" else "cuda:0")}
    summary = distill(cfg, setup=s)
    assert summary["nonfinite_steps"] == 0 and summary["first"]["loss"] == summary["first"]["loss"]
    assert _moved(tmp_path / "run") == 1.0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_nf4_teacher_loads_and_trains(tmp_path):
    """The default teacher: NF4 (bitsandbytes' kernels on the device), frozen; the student learns from it."""
    from minioprd.config import load_config
    from minioprd.distill import distill, prepare

    cfg = load_config(RECIPE, {"model.device": DEVICE, "model.teacher_quant": "4bit", "train.steps": 8,
                               "train.lr": 1e-2, "train.threads": 1, "train.output_dir": str(tmp_path / "run")})
    s = prepare(cfg, log=lambda m: None)
    q = [m for m in s.teacher.modules() if type(m).__name__ == "Linear4bit"]
    assert q and all(m.weight.dtype == torch.uint8 and m.weight.device.type == torch.device(DEVICE).type for m in q)
    assert not any(p.requires_grad for p in s.teacher.parameters())
    distill(cfg, setup=s)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
