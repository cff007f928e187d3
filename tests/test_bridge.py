"""OPRD-Bridge (minioprd.bridge): PCA, the student projection fit, the files, refusals, and `minioprd bridge`
end to end on the tiny pair (same tokenizer) and on a tiny teacher with another tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minioprd.bridge import PairFit, build_bridge, load_bridge, pca, save_bridge, train_projection
from minioprd.cli import app
from minioprd.errors import MinioprdError

runner = CliRunner()


def _synthetic(n: int = 1200, d_s: int = 48, d_t: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student rows and teacher rows that are a noisy linear function of them, with a large mean offset."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d_s, generator=g) * torch.linspace(0.5, 3.0, d_s)
    a = torch.randn(d_s, d_t, generator=g) / d_s ** 0.5
    t = s @ a + 0.05 * torch.randn(n, d_t, generator=g) + 5.0
    return s, t


def test_pca_matches_eigendecomposition_and_svd():
    _, t = _synthetic()
    P, mu, evals, total = pca(t, 8)
    assert P.shape == (8, 96) and mu.shape == (96,)
    torch.testing.assert_close(mu, t.mean(0))
    x = (t - t.mean(0)).double()
    cov = x.T @ x / (t.shape[0] - 1)
    w, v = torch.linalg.eigh(cov)  # direct eigen-decomposition, ascending
    torch.testing.assert_close(evals.double(), w.flip(0)[:8], rtol=1e-5, atol=1e-6)
    assert abs(total - float(w.sum())) < 1e-6 * float(w.sum())
    direct = v.flip(1)[:, :8].T  # (8, d), decreasing variance
    signs = torch.sign((direct * P.double()).sum(1))  # each direction equal up to sign
    torch.testing.assert_close(P.double(), direct * signs[:, None], atol=1e-5, rtol=0)
    torch.testing.assert_close(P @ P.T, torch.eye(8), atol=1e-5, rtol=0)  # orthonormal rows
    # The same subspace as the SVD of the centred data and torch.pca_lowrank.
    _, _, vt = torch.linalg.svd(x, full_matrices=False)
    proj = P.double().T @ P.double()
    torch.testing.assert_close(proj, vt[:8].T @ vt[:8], atol=1e-5, rtol=0)
    torch.manual_seed(0)
    _, _, v_lr = torch.pca_lowrank(t.double(), q=24, center=True, niter=8)  # randomized: oversampled
    torch.testing.assert_close(proj, v_lr[:, :8] @ v_lr[:, :8].T, atol=1e-4, rtol=0)
    with pytest.raises(MinioprdError, match="rank"):
        pca(t, 97)


def test_projection_training_reaches_high_cosine():
    s, t = _synthetic()
    P, mu, _, _ = pca(t[:1000], 8)
    z = (t - mu) @ P.T
    fit = train_projection(s[:1000], z[:1000], s[1000:], z[1000:], epochs=3)  # least-squares start
    assert fit.val_cos > 0.99 and fit.weight.shape == (8, 48)
    # AdamW from nn.Linear's random start (the authors' code) gets there too, given enough steps.
    fit = train_projection(s[:1000], z[:1000], s[1000:], z[1000:], epochs=20, lr=1e-2, batch_size=64,
                           init="random")
    assert fit.val_cos > 0.95 and fit.best_epoch > 0 and fit.history[-1] > fit.history[0]


def _fits(pairs: list[tuple[int, int]], r: int = 4, d_s: int = 6, d_t: int = 10) -> list[PairFit]:
    g = torch.Generator().manual_seed(1)
    return [PairFit(p, torch.randn(r, d_s, generator=g), torch.linalg.qr(torch.randn(d_t, r, generator=g))[0].T,
                    torch.randn(d_t, generator=g), 0.9, 3, 0.5) for p in pairs]


META = {"student": "Qwen2.5-0.5B", "teacher": "Qwen/Qwen2.5-7B", "student_key": "Qwen/Qwen2.5-0.5B",
        "teacher_key": "Qwen/Qwen2.5-7B", "same_tokenizer": True}


def test_save_load_round_trip_bitwise(tmp_path: Path):
    fits = _fits([(1, 1), (2, 3), (3, 4)])
    save_bridge(tmp_path, fits, META)
    meta = json.loads((tmp_path / "bridge.json").read_text())
    assert meta["rank"] == 4 and meta["layer_pairs"] == [[1, 1], [2, 3], [3, 4]]
    assert (meta["student_hidden"], meta["teacher_hidden"]) == (6, 10)
    # A subset of the pairs, in the run's order; a known short name and its hub id are the same model.
    b = load_bridge(tmp_path, "Qwen/Qwen2.5-0.5B", "Qwen2.5-7B", [(3, 4), (1, 1)], student_hidden=6,
                    teacher_hidden=10)
    assert b.pairs == [(3, 4), (1, 1)] and b.rank == 4
    for proj, f in zip(b.student_projections, (fits[2], fits[0])):
        assert torch.equal(proj.weight, f.P_S) and not proj.weight.requires_grad and proj.bias is None
    h = torch.randn(2, 5, 10)
    out = b.teacher_transform([h, h])
    assert torch.equal(out[0], (h - fits[2].mu_T) @ fits[2].P_T.T) and out[1].shape == (2, 5, 4)
    assert load_bridge(tmp_path, "Qwen2.5-0.5B", "Qwen2.5-7B", [(2, 3)], trainable=True) \
        .student_projections[0].weight.requires_grad
    b.save(tmp_path / "copy")  # e.g. after joint training: same tensors, same metadata
    c = load_bridge(tmp_path / "copy", "Qwen2.5-0.5B", "Qwen2.5-7B", [(3, 4), (1, 1)])
    assert all(torch.equal(x.weight, y.weight) for x, y in zip(b.student_projections, c.student_projections))
    assert torch.equal(c.P_T_0, b.P_T_0) and torch.equal(c.mu_T_1, b.mu_T_1)


@pytest.mark.parametrize("kwargs, match", [
    ({"student": "Qwen2.5-1.5B"}, "fitted for student 'Qwen2.5-0.5B'"),
    ({"teacher": "Qwen/Qwen2.5-14B"}, "fitted for teacher 'Qwen/Qwen2.5-7B'"),
    ({"pairs": [(1, 1), (2, 2)]}, r"2->2\] missing"),
    ({"teacher_hidden": 3584}, "teacher 10 wide"),
])
def test_mismatched_bridge_refused(tmp_path: Path, kwargs: dict, match: str):
    save_bridge(tmp_path, _fits([(1, 1), (2, 3)]), META)
    args = {"student": "Qwen2.5-0.5B", "teacher": "Qwen2.5-7B", "pairs": [(1, 1), (2, 3)], **kwargs}
    with pytest.raises(MinioprdError, match=match):
        load_bridge(tmp_path, args.pop("student"), args.pop("teacher"), args.pop("pairs"), **args)
    with pytest.raises(MinioprdError, match="not a bridge directory"):
        load_bridge(tmp_path / "nothing", "a", "b", [(1, 1)])


BRIDGE_ARGS = ["--dataset", "builtin:arithmetic", "--prompts", "16", "--max-new-tokens", "8", "--epochs", "2",
               "--batch-size", "8", "--teacher-quant", "none", "--device", "cpu", "--threads", "1"]


def test_bridge_cli_then_stage2_loss(tmp_path: Path, tiny_dirs):
    from minioprd.capture import capture_hidden, num_layers
    from minioprd.config import LoraConfig
    from minioprd.layers import layer_map, state_window
    from minioprd.losses import layer_cosines, representation_loss
    from minioprd.models import load_student, load_teacher, load_tokenizer, resolve_model
    from minioprd.rollout import rollout

    out = tmp_path / "bridge"
    r = runner.invoke(app, ["bridge", "--teacher", "builtin:tiny-teacher", "--student", "builtin:tiny-student",
                            "-o", str(out), "--ranks", "4,8", *BRIDGE_ARGS])
    assert r.exit_code == 0, r.output
    assert "rank sweep" in r.output and "val cos" in r.output
    meta = json.loads((out / "bridge.json").read_text())
    assert meta["rank"] == 8 and meta["layer_pairs"] == [[1, 1], [2, 4]] and meta["same_tokenizer"]
    assert meta["collect"]["rows"] == 16 * 8 and set(meta["metrics"]["sweep"]) == {"4", "8"}
    assert (out / "rank-4" / "bridge.safetensors").is_file() and not (out / "states").exists()
    again = runner.invoke(app, ["bridge", "--teacher", "builtin:tiny-teacher", "--student",
                                "builtin:tiny-student", "-o", str(out), *BRIDGE_ARGS])
    assert again.exit_code == 2 and "already holds a bridge" in again.output

    # Stage 2: the frozen bridge in the representation loss; gradients reach only the student's LoRA.
    s_res, t_res = resolve_model("builtin:tiny-student"), resolve_model("builtin:tiny-teacher")
    tok = load_tokenizer(s_res)
    student = load_student(s_res, LoraConfig(r=4, alpha=8), device="cpu")
    teacher = load_teacher(t_res, "none", "cpu")
    pairs = layer_map("all", num_layers(student), num_layers(teacher))
    bridge = load_bridge(out, "builtin:tiny-student", "builtin:tiny-teacher", pairs,
                         student_hidden=student.config.hidden_size, teacher_hidden=teacher.config.hidden_size)
    with pytest.raises(MinioprdError, match="fitted for student"):
        load_bridge(out, "builtin:tiny-teacher", "builtin:tiny-student", pairs)
    prompts = [tok("What is 1+2?", add_special_tokens=False)["input_ids"], tok("Hi", add_special_tokens=False)[
        "input_ids"]]
    torch.manual_seed(0)
    ro = rollout(student, tok, prompts, max_new_tokens=6)
    win = state_window(ro.prompt_len, ro.response_mask, "predict")
    with torch.no_grad():
        targets = capture_hidden(teacher, ro.input_ids, ro.attention_mask, ro.position_ids(),
                                 [b for _, b in pairs], win.start, win.stop)
    student.train()
    states = capture_hidden(student, ro.input_ids, ro.attention_mask, ro.position_ids(), [a for a, _ in pairs],
                            win.start, win.stop)
    loss, per_layer = representation_loss(states, bridge.teacher_transform(targets), win.mask,
                                          kind="normalized_mse", projections=bridge.student_projections)
    assert torch.isfinite(loss) and per_layer.shape == (2,) and 0 < float(loss.detach()) <= 4 / bridge.rank
    loss.backward()
    lora = [p for n, p in student.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters()
               if "lora_B" in n)
    assert all(p.grad is None for n, p in student.named_parameters() if "lora_" not in n)
    assert all(p.grad is None for p in bridge.parameters())
    cos = layer_cosines(states, bridge.teacher_transform(targets), win.mask, bridge.student_projections)
    assert cos.shape == (2,) and torch.isfinite(cos).all()


def test_bridge_across_tokenizers(tmp_path: Path, tiny_dirs):
    """A tiny teacher with another tokenizer and chat template reads the student's responses as text."""
    from test_cross_tokenizer import other_tokenizer

    from minioprd.builtin.tiny import build_model

    tok = other_tokenizer()
    teacher = build_model("tiny-teacher", len(tok), seed=5)
    teacher.config.eos_token_id = teacher.generation_config.eos_token_id = tok.eos_token_id
    teacher.config.pad_token_id = teacher.generation_config.pad_token_id = tok.pad_token_id
    t_dir = tmp_path / "other-teacher"
    teacher.save_pretrained(t_dir)
    tok.save_pretrained(t_dir)
    logs: list[str] = []
    summary = build_bridge(str(t_dir), "builtin:tiny-student", "builtin:arithmetic", tmp_path / "b", rank=4,
                           prompts=12, max_new_tokens=8, epochs=2, batch_size=6, teacher_quant="none",
                           device="cpu", threads=1, keep_states=True, log=logs.append)
    assert not summary["same_tokenizer"] and any("tokenizers differ" in m for m in logs)
    c = summary["collect"]
    assert 0.3 < c["exact_frac"] <= c["aligned_frac"] <= 1 and 0 < c["rows"] <= 12 * 8
    states = json.loads((tmp_path / "b" / "states" / "collect.json").read_text())
    assert states["same_tokenizer"] is False and len(states["shards"]) == 2
    meta = json.loads((tmp_path / "b" / "bridge.json").read_text())
    assert meta["same_tokenizer"] is False and meta["teacher_hidden"] == 128 and meta["align_mode"] == "cover"
    b = load_bridge(tmp_path / "b", "builtin:tiny-student", str(t_dir), [(1, 1), (2, 4)])
    assert b.rank == 4
    # Refit the kept states at another rank without running the models again.
    refit = build_bridge(None, None, None, tmp_path / "b2", rank=2, epochs=1, states=tmp_path / "b" / "states",
                         device="cpu", threads=1)
    assert refit["rank"] == 2 and refit["collect"] == c
