"""train.fit=auto: memory settings the user left alone are chosen for the card before any weights load, with a
mocked card (torch.cuda's device queries monkeypatched); and `minioprd plan` for loss.objective=auto."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minioprd.cli import app
from minioprd.config import load_config
from minioprd.errors import MinioprdError
from minioprd.fit import FIT_KEYS, HEADROOM, detect_card, fit_to_card, ladder
from minioprd.catalog import GPUS
from minioprd.estimate import GIB
from minioprd.plan import plan

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = {"model.teacher": "Qwen2.5-7B-Instruct", "model.student": "Qwen2.5-0.5B-Instruct"}  # the README's
runner = CliRunner()


def fake_card(monkeypatch, free_gib: float, name: str = "Tesla T4", bf16: bool = False) -> None:
    """Pretend to be a CUDA machine whose card has `free_gib` free (what torch.cuda.mem_get_info answers)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), int(16 * GIB)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def values(cfg) -> dict:
    return {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in FIT_KEYS}


def peak(cfg, gib: float) -> float:
    """The planner's peak for cfg's settings exactly as they are (fitting off) on a card of `gib`."""
    c = load_config(None, {**{k: v for k, v in values(cfg).items()}, "model.teacher": cfg.model.teacher,
                           "model.student": cfg.model.student, "loss.objective": cfg.loss.objective,
                           "rollout.prompts_per_step": cfg.rollout.prompts_per_step,
                           "rollout.max_new_tokens": cfg.rollout.max_new_tokens, "train.fit": "off"})
    return plan(c, vram_gb=gib, propose=False).peak_gib()


# ------------------------------------------------------------------------------------------ the planner


def test_headline_command_fits_a_t4_by_default():
    fitted = plan(load_config(None, HEADLINE), gpu="t4")
    plain = plan(load_config(None, {**HEADLINE, "train.fit": "off"}), gpu="t4")
    assert plain.fits is False and plain.peak_gib() > 20  # the plain defaults: ~22 GiB, 147% of a T4
    assert fitted.fits and fitted.peak_gib() <= HEADROOM * GPUS["t4"].mib / 1024
    assert fitted.fit.changed and set(fitted.fit.changed) <= set(FIT_KEYS)
    assert fitted.fit.given_peak / GIB == pytest.approx(plain.peak_gib())
    auto = plan(load_config(None, {**HEADLINE, "loss.objective": "auto"}), gpu="t4")
    assert auto.fits and auto.objective == "opd_full"


def test_ladder_keeps_explicit_values_and_goes_fastest_first():
    free = ladder(load_config(None, {**HEADLINE, "loss.objective": "opd_full"}))
    assert free[0] == {"lora.gradient_checkpointing": False, "rollout.micro_batch": 0, "loss.opd_chunk": 512}
    assert free[-1] == {"lora.gradient_checkpointing": True, "rollout.micro_batch": 1, "loss.opd_chunk": 128}
    assert [c["lora.gradient_checkpointing"] for c in free] == sorted(c["lora.gradient_checkpointing"] for c in free)
    pinned = ladder(load_config(None, {**HEADLINE, "rollout.micro_batch": 4, "lora.gradient_checkpointing": False,
                                       "loss.objective": "oprd"}))  # oprd: no logits chunk to vary
    assert pinned == [{"lora.gradient_checkpointing": False, "rollout.micro_batch": 4, "loss.opd_chunk": 512}]


def test_plan_for_objective_auto_names_what_it_planned_for():
    wide = plan(load_config(None, {**HEADLINE, "loss.objective": "auto"}), gpu="a100-80")
    full = plan(load_config(None, {**HEADLINE, "loss.objective": "opd_full"}), gpu="a100-80")
    assert wide.objective == "opd_full" and wide.objective_reason.startswith("auto: opd_full: ")
    assert wide.peak_gib() == pytest.approx(full.peak_gib())
    assert any(t.name.startswith("loss activations") and "OPD" in t.name for t in wide.terms)
    same_cfg = load_config(ROOT / "recipes/same-arch-justrl-to-r1-distill-1.5b.yaml", {"loss.objective": "auto"})
    same = plan(same_cfg, gpu="3090")
    both = {o: plan(load_config(ROOT / "recipes/same-arch-justrl-to-r1-distill-1.5b.yaml", {"loss.objective": o}),
                    gpu="3090").peak_gib() for o in ("oprd", "opd_full")}
    assert "costlier" in same.objective_reason
    assert same.objective == max(both, key=both.get) and same.peak_gib() == pytest.approx(max(both.values()))
    cross = plan(load_config(None, {"model.teacher": "Llama-3.2-1B", "model.student": "Qwen2.5-0.5B",
                                    "loss.objective": "auto"}), gpu="t4")
    assert cross.objective == "oprd" and "OPRD-Bridge" in cross.objective_reason
    explicit = plan(load_config(None, {**HEADLINE, "loss.objective": "oprd"}), gpu="t4")
    assert explicit.objective == "oprd" and explicit.objective_reason == ""


def test_cli_plan_says_objective_and_fit():
    r = runner.invoke(app, ["plan", "--teacher", "Qwen2.5-7B-Instruct", "--student", "Qwen2.5-0.5B-Instruct",
                            "--gpu", "t4", "loss.objective=auto"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "objective: opd_full (auto" in text and "train.fit=auto for NVIDIA T4" in text
    assert "fits on NVIDIA T4" in text and "does NOT fit" not in text
    r = runner.invoke(app, ["plan", "--teacher", "Qwen2.5-7B-Instruct", "--student", "Qwen2.5-0.5B-Instruct",
                            "--gpu", "t4", "--json"])
    d = json.loads(r.output)
    # no objective given: the default, auto, is planned as opd_full for these shapes
    assert d["fits"] and d["fit"]["changed"] and d["fit"]["given_peak_gib"] > 20 and d["objective"] == "opd_full"


# ------------------------------------------------------------------------------------------ a mocked card


def test_t4_sized_card_gets_a_micro_batch_and_fits(monkeypatch):
    fake_card(monkeypatch, 14.5)
    cfg = load_config(None, HEADLINE)
    lines: list[str] = []
    f = fit_to_card(cfg, lines.append)
    assert f is not None and f.fits and f.changed == {"rollout.micro_batch": 2}  # the fastest that fits
    assert values(cfg)["rollout.micro_batch"] == 2 and cfg.lora.gradient_checkpointing is False
    assert len(lines) == 1 and "train.fit=auto for Tesla T4 (cuda, 14.5 GiB free)" in lines[0]
    assert "rollout.micro_batch=2" in lines[0] and "estimated peak" in lines[0]
    card_gib = 14.5 + 500 / 1024  # the planner counts the CUDA context, already out of the free memory
    assert peak(cfg, card_gib) <= HEADROOM * card_gib < peak(load_config(None, HEADLINE), card_gib)
    assert fit_to_card(cfg, lines.append) is None and len(lines) == 1  # once per config: prepare after distill


def test_smaller_card_turns_on_checkpointing(monkeypatch):
    fake_card(monkeypatch, 8.0)
    cfg = load_config(None, {**HEADLINE, "loss.objective": "opd_full"})
    f = fit_to_card(cfg, lambda m: None)
    assert f.fits and cfg.lora.gradient_checkpointing is True and cfg.rollout.micro_batch in (1, 2, 4)
    assert peak(cfg, 8.0 + 500 / 1024) <= 8.0 + 500 / 1024


def test_80gb_card_keeps_the_fast_defaults(monkeypatch):
    fake_card(monkeypatch, 79.0, "NVIDIA A100-SXM4-80GB", bf16=True)
    cfg = load_config(None, HEADLINE)
    lines: list[str] = []
    f = fit_to_card(cfg, lines.append)
    assert f.fits and not f.changed and values(cfg) == values(load_config(None, HEADLINE))
    assert "the settings as given fit" in lines[0]


def test_explicit_settings_are_never_changed(monkeypatch):
    fake_card(monkeypatch, 14.5)
    cfg = load_config(None, {**HEADLINE, "rollout.micro_batch": 8})  # the whole batch, set on purpose
    fit_to_card(cfg, lambda m: None)
    assert cfg.rollout.micro_batch == 8 and cfg.lora.gradient_checkpointing is True  # the one left to choose
    set_in_code = load_config(None, HEADLINE)
    set_in_code.rollout.micro_batch = 4  # a notebook's assignment counts as explicit too
    fit_to_card(set_in_code, lambda m: None)
    assert set_in_code.rollout.micro_batch == 4
    recipe = load_config(ROOT / "recipes/colab-t4-qwen2.5-7b-to-0.5b.yaml")
    before = values(recipe)
    assert not fit_to_card(recipe, lambda m: None).changed and values(recipe) == before
    off = load_config(None, {**HEADLINE, "train.fit": "off"})
    assert fit_to_card(off, lambda m: None) is None and values(off) == values(load_config(None, HEADLINE))


def test_too_small_card_is_refused_with_a_rollout_that_fits(monkeypatch):
    fake_card(monkeypatch, 8.5)
    cfg = load_config(None, {**HEADLINE, "rollout.prompts_per_step": 16, "rollout.max_new_tokens": 4096,
                             "loss.objective": "oprd"})
    with pytest.raises(MinioprdError, match=r"does not fit .* even with lora.gradient_checkpointing=true "
                                            r"rollout.micro_batch=1 .*try rollout.prompts_per_step=\d+ "
                                            r"rollout.max_new_tokens=\d+ .*train.fit=off") as e:
        fit_to_card(cfg, lambda m: None)
    overrides = dict(kv.split("=") for kv in str(e.value).split("try ")[1].split(" (~")[0].split())
    retry = load_config(None, {**HEADLINE, **overrides})
    assert fit_to_card(retry, lambda m: None).fits  # the proposal, typed as shown, runs


def test_cli_refuses_before_loading_anything(monkeypatch, tmp_path):
    fake_card(monkeypatch, 6.0)
    loaded = []
    monkeypatch.setattr("minioprd.models.load_teacher", lambda *a, **k: loaded.append(a))
    out = tmp_path / "run"
    r = runner.invoke(app, ["distill", "--teacher", "Qwen2.5-7B-Instruct", "--student", "Qwen2.5-0.5B-Instruct",
                            "--dataset", "builtin:arithmetic", "-o", str(out)])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not fit Tesla T4" in lines[0], lines
    assert "weights, optimizer state and CUDA context alone take" in lines[0]
    assert not out.exists() and not loaded and "Traceback" not in r.output


def test_cpu_runs_are_not_fitted(monkeypatch):
    cfg = load_config(None, HEADLINE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_card(cfg) is None and fit_to_card(cfg, lambda m: None) is None
    fake_card(monkeypatch, 1.0)
    cpu = load_config(None, {**HEADLINE, "model.device": "cpu"})
    assert fit_to_card(cpu, lambda m: None) is None and values(cpu) == values(load_config(None, HEADLINE))


def test_fitted_run_records_its_settings_and_reruns_as_the_same_command(monkeypatch, tmp_path):
    """The fitted values go to config.yaml, and the same command again is recognised as the same run."""
    import minioprd.fit as fit_mod
    from minioprd.catalog import GPU

    monkeypatch.setattr(fit_mod, "detect_card", lambda cfg: GPU("a mocked card", 614, True))  # 0.6 GiB
    args = ["distill", "-r", str(ROOT / "recipes/tiny-cpu.yaml"), "-o", str(tmp_path / "run"), "--steps", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "train.fit=auto for a mocked card: rollout.micro_batch=4" in " ".join(r.output.split())
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "  micro_batch: 4  #" in saved
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "already complete" in r.output, r.output
