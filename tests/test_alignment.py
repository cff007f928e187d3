"""alignment.py: student-vs-teacher metrics on the student's own responses, and loading a run's student."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from minioprd.alignment import alignment_report, distinct_n, is_looping, load_run_student, repetition_rate


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def _prompts(tokenizer, k: int = 4) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a}+{a + 7}?"}], tokenize=False,
                                           add_generation_prompt=True) for a in range(10, 10 + k)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_distinct_and_repetition_on_crafted_tokens():
    a = [1, 2, 3, 4, 5]  # 4-grams (1,2,3,4), (2,3,4,5)
    b = [1, 2, 3, 4, 1, 2, 3, 4]  # (1,2,3,4) x2, (2,3,4,1), (3,4,1,2), (4,1,2,3)
    # pooled: 7 4-grams; unique: (1,2,3,4), (2,3,4,5), (2,3,4,1), (3,4,1,2), (4,1,2,3) = 5
    assert distinct_n([a, b], 4) == pytest.approx(5 / 7)
    assert distinct_n([[1, 2, 3]], 4) is None
    assert distinct_n([list(range(20))], 4) == 1.0
    loop = [9, 8] + [5, 6, 7] * 6  # period-3 loop filling the response
    assert is_looping(loop) and not is_looping(list(range(30))) and not is_looping([1, 1, 1])
    long_loop = list(range(100, 140)) + list(range(14)) * 3  # period 14, filling the last 32 tokens
    assert is_looping(long_loop) and not is_looping(list(range(100, 140)) + list(range(15)) * 3)
    assert not is_looping([1, 2, 3, 4] * 2 + list(range(10, 40)))  # a repeat early on, then fluent
    assert is_looping([7] * 6)  # "the the the ...": (7,7,7,7) three times in 6 tokens
    assert repetition_rate([loop, list(range(30))]) == 0.5 and repetition_rate([]) == 0.0


def test_same_model_gives_zero_kl_and_unit_cosine(tiny_dirs, tiny_tokenizer):
    teacher = _load(tiny_dirs["teacher"])
    pairs = [(1, 1), (2, 2), (3, 3), (4, 4)]
    rep = alignment_report(teacher, teacher, tiny_tokenizer, _prompts(tiny_tokenizer), pairs, max_new_tokens=12,
                           batch_size=3)
    assert rep["kl"] == pytest.approx(0.0, abs=1e-5)
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in rep["layer_cos"])
    assert rep["cos_last"] == pytest.approx(1.0, abs=1e-5)
    assert rep["prompts"] == 4 and len(rep["samples"]) == 4 and rep["tokens"] > 0
    assert 1 <= rep["response_len"] <= 12 and 0.0 <= rep["eos_frac"] <= 1.0
    # two copies loaded separately (same dir, no adapter) agree too
    rep2 = alignment_report(_load(tiny_dirs["teacher"]), teacher, tiny_tokenizer, _prompts(tiny_tokenizer), pairs,
                            max_new_tokens=12)
    assert rep2["kl"] == pytest.approx(0.0, abs=1e-5) and rep2["samples"] == rep["samples"]


def test_different_models_kl_positive_and_cosines_need_projections(tiny_dirs, tiny_tokenizer):
    student, teacher = _load(tiny_dirs["student"]), _load(tiny_dirs["teacher"])
    pairs = [(1, 1), (2, 4)]
    rep = alignment_report(student, teacher, tiny_tokenizer, _prompts(tiny_tokenizer), pairs, max_new_tokens=10)
    assert rep["kl"] > 0.01 and math.isfinite(rep["kl"])
    assert rep["layer_cos"] is None and rep["cos_last"] is None  # widths 64 vs 128: not comparable
    torch.manual_seed(0)
    projections = [torch.nn.Linear(64, 128, bias=False) for _ in pairs]
    rep_p = alignment_report(student, teacher, tiny_tokenizer, _prompts(tiny_tokenizer), pairs, projections,
                             max_new_tokens=10)
    assert len(rep_p["layer_cos"]) == 2 and all(-1 <= c <= 1 for c in rep_p["layer_cos"])
    assert rep_p["kl"] == pytest.approx(rep["kl"])  # the KL never uses projections
    # fixed reference tokens (the teacher's own answers): the same figures as measuring the teacher's rollout
    from minioprd.rollout import rollout

    ref = [rollout(teacher, tiny_tokenizer, _prompts(tiny_tokenizer), n=1, temperature=0.0, max_new_tokens=10)]
    rep_r = alignment_report(student, teacher, tiny_tokenizer, _prompts(tiny_tokenizer), pairs, projections,
                             max_new_tokens=10, reference=ref)
    assert rep_r["kl"] == pytest.approx(rep_p["kl"]) and rep_r["ref_tokens"] == int(ref[0].response_mask.sum())
    assert rep_r["ref_kl"] > 0 and len(rep_r["ref_layer_cos"]) == 2 and "ref_kl" not in rep_p
    rep_same = alignment_report(teacher, teacher, tiny_tokenizer, _prompts(tiny_tokenizer), [(4, 4)],
                                max_new_tokens=10, reference=ref)
    assert rep_same["ref_kl"] == pytest.approx(0.0, abs=1e-5)


def test_cross_tokenizer_path_pairs_the_same_states(tiny_dirs, tiny_tokenizer):
    # With the teacher "reading the text" in the same tokenizer the alignment is the identity: the cosines must
    # be those of the direct path, every token aligned exactly, and no KL (the path assumes other vocabularies).
    from minioprd.cross_tokenizer import CrossTokenizer, prompt_table

    student, teacher = _load(tiny_dirs["student"]), _load(tiny_dirs["teacher"])
    pairs, prompts = [(1, 2), (2, 4)], _prompts(tiny_tokenizer, 3)
    torch.manual_seed(0)
    projections = [torch.nn.Linear(64, 128, bias=False) for _ in pairs]
    direct = alignment_report(student, teacher, tiny_tokenizer, prompts, pairs, projections, max_new_tokens=10)
    cross = CrossTokenizer(tiny_tokenizer, tiny_tokenizer, prompt_table(prompts, prompts))
    rep = alignment_report(student, teacher, tiny_tokenizer, prompts, pairs, projections, max_new_tokens=10,
                           cross=cross)
    assert rep["layer_cos"] == pytest.approx(direct["layer_cos"], abs=1e-4)
    assert rep["kl"] is None and rep["aligned_frac"] == 1.0 and rep["exact_frac"] == 1.0
    assert rep["samples"] == direct["samples"] and "aligned_frac" not in direct
    with pytest.raises(Exception, match="reference"):
        alignment_report(student, teacher, tiny_tokenizer, prompts, pairs, cross=cross, reference=[])


def test_bridge_cosines_are_taken_in_its_subspace(tiny_dirs, tiny_tokenizer):
    from minioprd.bridge import Bridge

    teacher = _load(tiny_dirs["teacher"])
    pairs, d, r = [(2, 2), (4, 4)], teacher.config.hidden_size, 8
    torch.manual_seed(0)
    P = [torch.linalg.qr(torch.randn(d, r))[0].T for _ in pairs]  # (r, d) orthonormal rows
    zero = [torch.zeros(d) for _ in pairs]
    # the teacher against itself with P_S = P_T and no centring: identical r-dim vectors
    same = Bridge(pairs, P, P, zero, {})
    rep = alignment_report(teacher, teacher, tiny_tokenizer, _prompts(tiny_tokenizer, 2), pairs, max_new_tokens=8,
                           bridge=same)
    assert rep["layer_cos"] == pytest.approx([1.0, 1.0], abs=1e-5) and rep["settings"]["bridge_rank"] == r
    # the teacher side is centred (h_T - mu_T) before P_T: a shift moves the cosines off 1
    shifted = Bridge(pairs, P, P, [torch.full((d,), 3.0) for _ in pairs], {})
    rep = alignment_report(teacher, teacher, tiny_tokenizer, _prompts(tiny_tokenizer, 2), pairs, max_new_tokens=8,
                           bridge=shifted)
    assert all(c < 0.99 for c in rep["layer_cos"])
    with pytest.raises(Exception, match="not both"):
        alignment_report(teacher, teacher, tiny_tokenizer, _prompts(tiny_tokenizer, 1), pairs,
                         [torch.nn.Identity(), torch.nn.Identity()], bridge=same)


def test_four_bit_teacher(tiny_dirs, tiny_tokenizer):
    from minioprd.models import ResolvedModel, load_teacher

    teacher = load_teacher(ResolvedModel("t", str(tiny_dirs["teacher"]), ""), "4bit", "cpu")
    student = _load(tiny_dirs["student"])
    rep = alignment_report(student, teacher, tiny_tokenizer, _prompts(tiny_tokenizer, 2), [(2, 4)],
                           max_new_tokens=8)
    assert math.isfinite(rep["kl"]) and rep["kl"] > 0


def test_run_dir_round_trip(tmp_path, tiny_dirs, tiny_tokenizer):
    """A 3-step distill run loads back; the report's cosines equal a direct computation with its projections."""
    from safetensors.torch import load_file

    from minioprd.capture import capture_hidden
    from minioprd.config import load_config
    from minioprd.distill import distill
    from minioprd.layers import state_window
    from minioprd.losses import layer_cosines
    from minioprd.rollout import rollout

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu.yaml"
    cfg = load_config(recipe, {"train.steps": 3, "train.output_dir": str(tmp_path / "run"), "rollout.n": 1,
                               "rollout.max_new_tokens": 12, "model.teacher_quant": "none",
                               "train.threads": 1})
    distill(cfg)
    adapter = tmp_path / "run" / "adapter"
    student, projections, pairs = load_run_student(adapter)
    torch.set_num_threads(1)
    assert pairs == [(1, 1), (2, 4)] and projections is not None and len(projections) == 2
    saved = load_file(str(adapter / "projections.safetensors"))
    assert torch.equal(projections[1].weight, saved["s2_t4.weight"])
    assert load_run_student(tmp_path / "run")[2] == pairs  # the run directory itself works too
    # the adapter is really applied: LoRA moved the student away from its base
    base = _load(tiny_dirs["student"])
    ids = torch.tensor([_prompts(tiny_tokenizer, 1)[0]])
    with torch.no_grad():
        assert not torch.allclose(student(ids).logits, base(ids).logits)

    teacher = _load(tiny_dirs["teacher"])
    prompts = _prompts(tiny_tokenizer, 3)
    rep = alignment_report(student, teacher, tiny_tokenizer, prompts, pairs, projections, max_new_tokens=10,
                           batch_size=8)
    # direct: the same greedy rollout, the run's projections read straight from the file
    ro = rollout(student, tiny_tokenizer, prompts, n=1, temperature=0.0, max_new_tokens=10)
    win = state_window(ro.prompt_len, ro.response_mask, "predict")
    pos = ro.position_ids()
    with torch.no_grad():
        s = capture_hidden(student, ro.input_ids, ro.attention_mask, pos, [1, 2], win.start, win.stop)
        t = capture_hidden(teacher, ro.input_ids, ro.attention_mask, pos, [1, 4], win.start, win.stop)
    direct = []
    for a, b in pairs:
        lin = torch.nn.Linear(64, 128, bias=False)
        lin.weight.data.copy_(saved[f"s{a}_t{b}.weight"])
        direct.append(lin)
    expected = layer_cosines(s, t, win.mask, direct)
    assert rep["layer_cos"] == pytest.approx(expected.tolist(), abs=1e-5)


def test_load_run_student_errors(tmp_path):
    from minioprd.errors import MinioprdError

    with pytest.raises(MinioprdError, match="minioprd.json"):
        load_run_student(tmp_path)
