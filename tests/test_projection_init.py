"""loss.projection_init=lstsq: width projections start at the least-squares map from the student's states to
the teacher's, fitted on one rollout batch, without moving the run's random stream."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minioprd.capture import capture_hidden
from minioprd.config import load_config
from minioprd.distill import distill, prepare
from minioprd.projections import fit_projections
from minioprd.layers import position_mask, state_window
from minioprd.rollout import rollout

RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"


def _mse_per_layer(s, ro):
    """mean ||P h_S - h_T||^2 per mapped layer on `ro` (the quantity the fit minimises)."""
    sel = position_mask(ro.response_mask, "all", 0)
    win = state_window(ro.prompt_len, sel, "predict")
    pos = ro.position_ids()
    with torch.no_grad():
        hs = capture_hidden(s.student, ro.input_ids, ro.attention_mask, pos, [a for a, _ in s.pairs], win.start,
                            win.stop)
        ht = capture_hidden(s.teacher, ro.input_ids, ro.attention_mask, pos, [b for _, b in s.pairs], win.start,
                            win.stop)
        return [float(((p(x[win.mask]) - y[win.mask]) ** 2).mean()) for p, x, y in zip(s.projections, hs, ht)]


def test_lstsq_start_fits_better_than_random_and_keeps_the_rng(tmp_path):
    cfg = load_config(RECIPE, {"train.output_dir": str(tmp_path / "o"), "model.teacher_quant": "none",
                               "rollout.max_new_tokens": 12, "loss.projection_init": "lstsq"})
    s = prepare(cfg, log=lambda m: None)
    assert len(s.projections) == len(s.pairs) == 2  # tiny student 64 wide, teacher 128
    torch.manual_seed(0)
    ro = rollout(s.student, s.tokenizer, s.prompts[:cfg.rollout.prompts_per_step], n=cfg.rollout.n,
                 max_new_tokens=12)
    before = _mse_per_layer(s, ro)
    w0 = [p.weight.clone() for p in s.projections]
    state = torch.random.get_rng_state()
    r2 = fit_projections(s, log=lambda m: None)  # on its own rollout batch
    assert torch.equal(torch.random.get_rng_state(), state)  # the run samples exactly as without the fit
    assert all(0 < v <= 1 for v in r2)
    assert all(not torch.equal(a, p.weight) for a, p in zip(w0, s.projections))
    fit_projections(s, log=lambda m: None, ro=ro)  # on `ro`: no linear map does better there than the fit
    whole = [p.weight.clone() for p in s.projections]
    s.cfg.rollout.micro_batch = 1  # gathered sequence by sequence: the same sums, the same map
    fit_projections(s, log=lambda m: None, ro=ro)
    assert all(torch.allclose(w, p.weight, rtol=1e-4, atol=1e-5) for w, p in zip(whole, s.projections))
    s.cfg.rollout.micro_batch = 0
    after = _mse_per_layer(s, ro)
    assert all(a < b for a, b in zip(after, before)), (before, after)
    with torch.no_grad():
        for p in s.projections:  # ... not even a small step away from it
            p.weight.add_(1e-3 * torch.randn_like(p.weight))
    assert all(a < b for a, b in zip(after, _mse_per_layer(s, ro)))


def test_lstsq_run_trains_and_records_the_setting(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(RECIPE, {"train.output_dir": str(out), "model.teacher_quant": "none", "train.steps": 4,
                               "loss.projection_init": "lstsq"})
    import io

    from rich.console import Console

    buf = io.StringIO()
    distill(cfg, console=Console(file=buf, width=300))
    assert "projections: least-squares start on" in buf.getvalue()
    assert "projection_init: lstsq" in (out / "config.yaml").read_text()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["loss"] == r["loss"] for r in rows)  # finite, no NaN
