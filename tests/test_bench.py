"""`minioprd bench` runs in a tiny configuration and writes well-formed JSON (no timing assertions)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from minioprd.cli import app


def test_bench_update_writes_json(tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["bench", "update", "--student", "tiny", "--batch", "2", "--prompt-len", "4",
                                 "--response-len", "8", "--objectives", "oprd,opd_topk", "--threads", "1",
                                 "-o", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [row["objective"] for row in res["rows"]] == ["oprd", "opd_topk"]
    for row in res["rows"]:
        assert row["seconds"] > 0 and row["peak_increase_mb"] >= 0
    assert res["rows"][0]["time_vs_oprd"] == 1.0
    # same backbone work, plus the student's and the teacher's LM heads for OPD
    assert res["rows"][1]["gflop"] > res["rows"][0]["gflop"] > 0 and res["rows"][1]["work_vs_oprd"] > 1
    assert "time vs oprd" in r.stdout and "work vs oprd" in r.stdout


def test_flop_count_matches_hand_counts():
    import torch
    import torch.nn.functional as F

    from minioprd.bench import flop_counter, measure_one

    a, b = torch.randn(8, 5, requires_grad=True), torch.randn(5, 3)
    with (c := flop_counter()):
        (a @ b).sum().backward()
    assert c.total == 2 * 8 * 5 * 3 * 2  # forward, then grad of a (b needs none)
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    with (c := flop_counter()):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert c.total == 3 * (2 * 1 * 2 * 6 * 6 * (4 + 4))  # QK^T and PV; backward twice that
    # gradient checkpointing recomputes each block's forward in backward: counted, so more work
    kw = dict(arch="tiny", objective="oprd", batch=2, prompt_len=4, response_len=8, steps=1, device="cpu", threads=1)
    assert measure_one(**kw)["gflop"] > measure_one(**kw, gradient_checkpointing=False)["gflop"]


def test_micro_batched_update_does_the_same_work():
    from minioprd.bench import measure_one

    kw = dict(arch="tiny", batch=3, prompt_len=4, response_len=8, steps=1, device="cpu", threads=1)
    for objective in ("oprd", "opd_topk"):
        whole, parts = measure_one(objective=objective, **kw), measure_one(objective=objective, micro_batch=1, **kw)
        assert whole["micro_batch"] == 3 and parts["micro_batch"] == 1
        assert parts["gflop"] == pytest.approx(whole["gflop"], rel=1e-9)  # every sequence once, nothing twice
    r = CliRunner().invoke(app, ["bench", "update", "--student", "tiny", "--micro-batch", "-1"])
    assert r.exit_code == 2 and "--micro-batch must be >= 0" in r.stderr


def test_bench_rollout_json_and_bad_input(tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["bench", "rollout", "--student", "tiny", "--batch", "2", "--n", "2", "--prompt-len",
                                 "4", "--response-len", "6", "--threads", "1", "--settings",
                                 "plain,shared,packed,static", "-o", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["bench"] == "rollout" and (res["prompts"], res["n"], res["rows"]) == (2, 2, 4)
    assert [row["setting"] for row in res["rows_by_setting"]] == ["bare_generate", "plain", "shared", "packed",
                                                                  "static"]
    # the bound: every weight (tied embedding once) and the KV cache at the mean context, over the bandwidth
    from minioprd.bench import build_config

    c = build_config("tiny")
    params = c.vocab_size * c.hidden_size + c.num_hidden_layers * (
        c.hidden_size * (c.hidden_size + 2 * 32) + (c.hidden_size + 2 * 32) + c.hidden_size ** 2  # q,k,v, biases, o
        + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size) + c.hidden_size  # mlp, norms; final norm
    lora = c.num_hidden_layers * 16 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128),
                                                              (64, 128), (128, 64)])
    kv = c.num_hidden_layers * 2 * 4 * c.num_key_value_heads * 16 * (4 + 6 / 2)
    assert res["bytes_per_decode_step"] == 4 * (params + lora + kv)
    assert res["bound_decode_steps_per_s"] == pytest.approx(res["bandwidth_gb_s"] * 1e9 / res["bytes_per_decode_step"])
    for row in res["rows_by_setting"]:
        assert row["decode_steps"] == 6 and row["tokens"] == 24  # random weights never stop early
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
        assert row["fraction_of_bound"] == pytest.approx(row["decode_steps_per_s"] / res["bound_decode_steps_per_s"])
        assert row["same_tokens_as_bare"] == 1.0  # same seed, same tokens: each speed-up leaves the rollout as is
        assert len(row["all_seconds"]) == 1 and row["seconds"] == min(row["all_seconds"])
    assert res["rows_by_setting"][0]["speedup_vs_bare"] == 1.0 and res["notes"] == []
    assert res["tokens_per_s"] == {row["setting"]: row["tokens_per_s"] for row in res["rows_by_setting"]}
    assert "static" in r.stdout and "bound" in r.stdout
    r = CliRunner().invoke(app, ["bench", "rollout", "--student", "tiny", "--settings", "plain,turbo"])
    assert r.exit_code == 2 and "unknown --settings turbo" in r.stderr
    r = CliRunner().invoke(app, ["bench", "update", "--student", "gpt-9"])
    assert r.exit_code == 2 and "unknown --student shape" in r.stderr


def test_bench_step_breaks_whole_steps_down(tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(app, ["bench", "step", "--student", "tiny", "--batch", "2", "--prompt-len", "6",
                                 "--response-len", "8", "--steps", "2", "--threads", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["bench"] == "step" and res["teacher"] == "tiny" and res["gradient_checkpointing"] is True
    assert [row["objective"] for row in res["rows"]] == ["oprd", "opd_topk"]
    for row in res["rows"]:
        assert row["steps_measured"] == 1  # the warm-up step is not counted
        assert min(row["rollout_s"], row["teacher_s"], row["update_s"]) > 0
        parts = row["rollout_s"] + row["teacher_s"] + row["update_s"]
        assert abs(parts - row["step_s"]) < 1e-6 * max(1.0, row["step_s"])
        assert 0 < row["response_len"] <= 8
    assert "teacher" in r.stdout and "%" in r.stdout
    r = CliRunner().invoke(app, ["bench", "step", "--student", "tiny", "--teacher", "gpt-9"])
    assert r.exit_code == 2 and "unknown --teacher shape" in r.stderr
