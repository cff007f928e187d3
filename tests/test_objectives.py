"""Objectives in the loop: oprd, OPD baselines, and the combined L_OPD + mu * L_OPRD (paper Eq. 7)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from minioprd.config import load_config
from minioprd.distill import prepare, update_step
from minioprd.rollout import rollout

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml")  # from any working directory


@pytest.fixture(scope="module")
def setup_and_rollout(tmp_path_factory):
    cfg = load_config(RECIPE, {"train.output_dir": str(tmp_path_factory.mktemp("o")), "rollout.max_new_tokens": 12,
                               "model.teacher_quant": "none"})
    s = prepare(cfg, log=lambda m: None)
    torch.manual_seed(0)
    ro = rollout(s.student, s.tokenizer, s.prompts[:3], n=2, max_new_tokens=12)
    return s, ro


def _grads(s, ro, **loss):
    """Gradients of one update on a copy of the shared setup's config with `loss` set: no test sees another's
    settings, whatever the order they run in."""
    cfg = copy.deepcopy(s.cfg)
    cfg.loss = dataclasses.replace(cfg.loss, **loss)
    s = dataclasses.replace(s, cfg=cfg)
    params = [p for p in s.student.parameters() if p.requires_grad] + list(s.projections.parameters())
    for p in params:
        p.grad = None
    fig = update_step(s, ro)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return fig, grads


@pytest.mark.parametrize("opd", ["opd_sampled", "opd_topk", "opd_full"])
def test_combined_objective_is_the_sum_of_its_parts(setup_and_rollout, opd):
    s, ro = setup_and_rollout
    f_rep, g_rep = _grads(s, ro, objective="oprd", coef=1.0, mu=0.0)
    f_opd, g_opd = _grads(s, ro, objective=opd, mu=0.0)
    f_all, g_all = _grads(s, ro, objective=opd, mu=2.5)
    assert f_opd["layer_cos"] == [] and f_rep["loss_opd"] == 0.0
    assert f_all["loss"] == pytest.approx(f_opd["loss"] + 2.5 * f_rep["loss"], rel=1e-5)
    for a, b, c in zip(g_all, g_opd, g_rep):
        torch.testing.assert_close(a, b + 2.5 * c, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in g_opd)  # the OPD term alone trains the LoRA weights


def test_opd_only_gives_projections_no_gradient(setup_and_rollout):
    s, ro = setup_and_rollout
    _, grads = _grads(s, ro, objective="opd_full", mu=0.0)
    n_lora = len([p for p in s.student.parameters() if p.requires_grad])
    assert all(g.abs().sum() == 0 for g in grads[n_lora:])  # projections only serve the representation term


def test_opd_full_value_is_the_reverse_kl_on_response_tokens(setup_and_rollout):
    """Independent check: full logits of both models at the positions predicting each response token."""
    s, ro = setup_and_rollout
    f, _ = _grads(s, ro, objective="opd_full", mu=0.0)
    P, V = ro.prompt_len, min(s.student.config.vocab_size, s.teacher.config.vocab_size)
    pos = ro.position_ids()
    with torch.no_grad():
        ls = s.student(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
        lt = s.teacher(input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=pos).logits
    R = ro.response_mask.shape[1]
    lp_s = ls[:, P - 1:P - 1 + R, :V].float().log_softmax(-1)
    lp_t = lt[:, P - 1:P - 1 + R, :V].float().log_softmax(-1)
    kl = (lp_s.exp() * (lp_s - lp_t)).sum(-1)  # (B, R)
    expected = kl[ro.response_mask].mean()
    assert f["loss_opd"] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_distill_cli_runs_each_objective(tmp_path):
    from typer.testing import CliRunner

    from minioprd.cli import app

    for obj in ("opd_sampled", "opd_topk"):
        r = CliRunner().invoke(app, ["distill", "-r", RECIPE, "-o", str(tmp_path / obj), "--steps", "2",
                                     f"loss.objective={obj}", "loss.mu=1", "loss.topk=4"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / obj / "adapter" / "adapter_model.safetensors").is_file()
