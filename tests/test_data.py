"""Tests for minioprd.data: loading prompt sets, rendering, tokenizing, sampling and the arithmetic task."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from minioprd import data as data_mod
from minioprd.data import (
    PROMPT_FIELDS,
    Example,
    PromptSampler,
    arithmetic_examples,
    arithmetic_solution,
    load_examples,
    render_prompts,
    tokenize_prompts,
)
from minioprd.errors import MinioprdError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE tokenizer with a ChatML template, trained here (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"What is {a}+{b}? The answer is {a + b}. Please reason step by step." for a in range(40)
              for b in range(0, 40, 7)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template (a base model's)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = None
    return tok


def _write(path: Path, rows: list[dict]) -> Path:
    """Write `rows` in the format named by the path's suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_each_local_format_loads_prompts_and_answers(tmp_path, suffix):
    rows = [{"question": "What is 2+2?", "answer": "4", "level": 1},
            {"question": "What is 3*3?", "answer": "9", "level": 2}]
    path = _write(tmp_path / f"set{suffix}", rows)
    # A local file has only a `train` split: asking for `test` still reads the file.
    examples = load_examples(str(path), split="test", cache_dir=str(tmp_path / "cache"))
    assert [e.prompt for e in examples] == ["What is 2+2?", "What is 3*3?"]
    assert [e.answer for e in examples] == ["4", "9"]
    assert examples[1].meta["row"] == 1 and examples[1].meta["level"] == 2


def test_aime24_chat_list_and_boxed_ground_truth(tmp_path):
    examples = load_examples(str(FIXTURES / "aime24_3rows.parquet"), cache_dir=str(tmp_path))
    assert len(examples) == 3
    first = examples[0]
    assert isinstance(first.prompt, list) and [m["role"] for m in first.prompt] == ["user"]
    assert first.prompt[0]["content"].startswith("Every morning Aya")
    assert [e.answer for e in examples] == ["204", "113", "371"]  # `\boxed{204}` unwrapped
    assert first.meta["data_source"] == "AIME24"


def test_math500_latex_answers_kept_verbatim(tmp_path):
    examples = load_examples(str(FIXTURES / "math500_3rows.jsonl"), cache_dir=str(tmp_path), max_rows=2)
    assert len(examples) == 2  # max_rows truncates
    assert examples[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert examples[1].answer == "p - q"
    assert examples[0].meta["id"] == "test/precalculus/807.json"


def test_gsm8k_and_solution_answers(tmp_path):
    gsm = _write(tmp_path / "gsm.jsonl", [
        {"question": "Natalia sold clips...", "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 72"},
        {"question": "Big number?", "answer": "Total is 1,000.\n#### 1,000"},
    ])
    assert [e.answer for e in load_examples(str(gsm), cache_dir=str(tmp_path))] == ["72", "1000"]
    # A worked MATH solution: the answer is the content of its last box, nested braces included.
    sol = _write(tmp_path / "math.jsonl", [
        {"problem": "Half?", "solution": "First \\boxed{2}, then it is $\\boxed{\\frac{1}{2}}$."}])
    assert load_examples(str(sol), cache_dir=str(tmp_path))[0].answer == "\\frac{1}{2}"


@pytest.mark.parametrize("first", range(len(PROMPT_FIELDS) - 1))
def test_prompt_field_auto_detection_order(tmp_path, first):
    # Every later candidate is present too: the earliest in the documented order must win.
    row = {name: f"from {name}" for name in PROMPT_FIELDS[first:]}
    path = _write(tmp_path / "set.jsonl", [row])
    assert load_examples(str(path), cache_dir=str(tmp_path))[0].prompt == f"from {PROMPT_FIELDS[first]}"


def test_messages_drop_trailing_assistant_turn(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]}])
    prompt = load_examples(str(path), cache_dir=str(tmp_path))[0].prompt
    assert prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def test_explicit_missing_field_names_columns_and_suggests(tmp_path):
    path = _write(tmp_path / "set.jsonl", [{"prompt": "hi", "label": "x"}])
    with pytest.raises(MinioprdError) as err:
        load_examples(str(path), field="promt", cache_dir=str(tmp_path))
    msg = str(err.value)
    assert "did you mean 'prompt'" in msg and "[prompt, label]" in msg and "\n" not in msg
    with pytest.raises(MinioprdError, match="no column 'gold'"):
        load_examples(str(path), answer_field="gold", cache_dir=str(tmp_path))


def test_auto_field_absent_and_answers_optional(tmp_path):
    path = _write(tmp_path / "set.jsonl", [{"text": "hi", "label": "x"}])
    with pytest.raises(MinioprdError, match=r"no prompt column: found columns \[text, label\]"):
        load_examples(str(path), cache_dir=str(tmp_path))
    examples = load_examples(str(path), field="text", cache_dir=str(tmp_path))
    assert examples[0].prompt == "hi" and examples[0].answer is None  # no answer column is fine
    with_answer = _write(tmp_path / "ans.jsonl", [{"prompt": "hi", "answer": "1"}])
    assert load_examples(str(with_answer), answer_field="none", cache_dir=str(tmp_path))[0].answer is None


def test_empty_prompts(tmp_path):
    some = _write(tmp_path / "some.jsonl", [{"prompt": "  "}, {"prompt": "real"}, {"prompt": None}])
    examples = load_examples(str(some), cache_dir=str(tmp_path))
    assert [e.prompt for e in examples] == ["real"] and examples[0].meta["row"] == 1
    blank = _write(tmp_path / "blank.jsonl", [{"prompt": ""}, {"prompt": " "}])
    with pytest.raises(MinioprdError, match="all 2 prompts"):
        load_examples(str(blank), cache_dir=str(tmp_path))
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(MinioprdError, match="has no rows"):
        load_examples(str(empty), cache_dir=str(tmp_path))
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(MinioprdError, match="has no rows"):
        load_examples(str(tmp_path / "zero.jsonl"), cache_dir=str(tmp_path))


def test_missing_or_unsupported_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(MinioprdError, match=re.escape(str(missing))):
        load_examples(str(missing))
    with pytest.raises(MinioprdError, match="does not exist"):
        load_examples("data/sub/prompts")  # a path without suffix: not a hub name
    txt = tmp_path / "prompts.txt"
    txt.write_text("hi\n")
    with pytest.raises(MinioprdError, match="unsupported suffix"):
        load_examples(str(txt))


def test_malformed_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(MinioprdError, match="could not read .* JSON parse error"):
        load_examples(str(bad), cache_dir=str(tmp_path / "cache"))


def test_unknown_split_lists_available(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    _write(folder / "train.jsonl", [{"prompt": "a"}])
    _write(folder / "test.jsonl", [{"prompt": "b"}])
    assert load_examples(str(folder), split="test", cache_dir=str(tmp_path / "c"))[0].prompt == "b"
    with pytest.raises(MinioprdError, match=r"no split 'validation': available splits \['train', 'test'\]"):
        load_examples(str(folder), split="validation", cache_dir=str(tmp_path / "c"))


def test_hub_name_offline_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(MinioprdError) as err:
        load_examples("minioprd-tests/no-such-dataset-7f3a", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    assert "Hub" in str(err.value) and "\n" not in str(err.value)


def test_hub_unreachable_is_caught_before_datasets_retries(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data_mod, "_hub_reachable", lambda: False)

    def never(*args, **kwargs):
        raise AssertionError("load_dataset must not be called when the hub is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", never)
    with pytest.raises(MinioprdError, match="could not reach the Hugging Face Hub.*local"):
        load_examples("openai/gsm8k:main", cache_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------- builtin


def test_builtin_arithmetic_splits_are_deterministic_and_disjoint():
    train = load_examples("builtin:arithmetic")
    test = load_examples("builtin:arithmetic", split="test")
    assert len(train) == 2000 and len(test) == 200
    assert len({e.prompt for e in train}) == 2000  # no repeated question
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert [e.prompt for e in load_examples("builtin:arithmetic", max_rows=5)] == [e.prompt for e in train[:5]]
    assert all(re.fullmatch(r"What is \d{1,2}[+-]\d{1,2}\?", e.prompt) for e in train)
    assert {e.meta["op"] for e in train} == {"+", "-"}
    with pytest.raises(MinioprdError, match=r"available splits \[train, test\]"):
        load_examples("builtin:arithmetic", split="validation")
    with pytest.raises(MinioprdError, match="unknown built-in"):
        load_examples("builtin:poetry")


def test_arithmetic_solution_is_always_right():
    math_verify = pytest.importorskip("math_verify")
    rng = random.Random(123)
    examples = [e for d in (1, 2, 3, 4) for e in arithmetic_examples(125, seed=rng.randrange(10**6), digits=d)]
    assert len(examples) == 500
    for ex in examples:
        a, b, op = ex.meta["a"], ex.meta["b"], ex.meta["op"]
        truth = a + b if op == "+" else a - b
        assert truth >= 0 and ex.answer == str(truth) and ex.prompt == f"What is {a}{op}{b}?"
        solution = arithmetic_solution(ex)
        assert solution.endswith(f"\\boxed{{{truth}}}")
        # Every column step is itself correct arithmetic.
        steps = re.findall(r"(\d+(?:[+-]\d+)+)=(\d+)", solution)
        assert len(steps) == len(str(max(a, b)))  # one step per column
        assert all(eval(lhs) == int(rhs) for lhs, rhs in steps)  # digits and +/- only
        assert math_verify.verify(math_verify.parse(str(truth)), math_verify.parse(solution))
    assert arithmetic_solution(Example("What is 47+38?", "85", {"a": 47, "b": 38, "op": "+"})) == \
        "7+8=15, carry 1. 4+3+1=8. \\boxed{85}"
    assert arithmetic_solution(Example("What is 52-38?", "14", {"a": 52, "b": 38, "op": "-"})) == \
        "12-8=4, borrow 1. 5-1-3=1. \\boxed{14}"


# --------------------------------------------------------------------------------------------- rendering


def test_render_plain_text_template_and_suffix(plain_tokenizer):
    examples = [Example("What is 2+2?")]
    assert render_prompts(plain_tokenizer, examples) == ["What is 2+2?"]
    assert render_prompts(plain_tokenizer, examples, template="Q: {prompt}\nA:", suffix="Think.") == \
        ["Q: What is 2+2?\nA: Think."]
    assert render_prompts(plain_tokenizer, examples, suffix="\nThink.") == ["What is 2+2?\nThink."]
    with pytest.raises(MinioprdError, match="no chat template.*chat_template=false"):
        render_prompts(plain_tokenizer, examples, chat_template="true")
    with pytest.raises(MinioprdError, match="braces"):
        render_prompts(plain_tokenizer, examples, template="{prompt} in \\boxed{}")


def test_render_with_chat_template(tokenizer):
    examples = [Example("What is 2+2?")]
    (text,) = render_prompts(tokenizer, examples, suffix="Put it in \\boxed{}.")
    assert text == ("<|im_start|>user\nWhat is 2+2? Put it in \\boxed{}.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    (text,) = render_prompts(tokenizer, examples, system_prompt="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?")
    assert render_prompts(tokenizer, examples, chat_template="false") == ["What is 2+2?"]


def test_render_chat_list_suffix_goes_to_last_user_message(tokenizer):
    chat = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "second"}]
    example = Example(chat)
    (text,) = render_prompts(tokenizer, [example], template="Q: {prompt}", suffix="Think.")
    assert "user\nfirst<|im_end|>" in text and "user\nQ: second Think.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert example.prompt[2]["content"] == "second"  # rendering does not mutate the examples
    assert render_prompts(tokenizer, [example], suffix="Think.", chat_template="false") == \
        ["first\n\nok\n\nsecond Think."]


# --------------------------------------------------------------------------------------------- tokenizing


def test_tokenize_skip_and_truncate(tokenizer):
    short, long_ = "What is 2+2?", "Please reason step by step. " * 20 + "What is 7+8?"
    texts = [short, long_, short]
    n_long = len(tokenizer(long_, add_special_tokens=False)["input_ids"])
    limit = 12
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= limit < n_long

    ids, kept, skipped = tokenize_prompts(tokenizer, texts, limit)
    assert kept == [0, 2] and skipped == 1 and len(ids) == 2

    ids, kept, skipped = tokenize_prompts(tokenizer, texts, limit, long_prompts="truncate")
    assert kept == [0, 1, 2] and skipped == 0 and len(ids[1]) == limit
    assert tokenizer.decode(ids[1]).endswith("What is 7+8?")  # the end of the question is kept

    with pytest.raises(MinioprdError, match="all 1 prompts are longer than max_prompt_tokens=12"):
        tokenize_prompts(tokenizer, [long_], limit)


def test_tokenize_chat_text_gets_no_extra_special_tokens(tokenizer):
    (text,) = render_prompts(tokenizer, [Example("What is 2+2?")])
    (ids,), _, _ = tokenize_prompts(tokenizer, [text], 512)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids.count(start) == 2  # user and assistant turns, nothing prepended
    assert tokenizer.decode(ids) == text


class _BosTokenizer:
    """A minimal tokenizer that wants a BOS (like Llama's): one id per character, BOS = 1."""

    bos_token, bos_token_id, add_bos_token = "^", 1, True

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False  # data.py adds BOS itself, never an EOS
        return {"input_ids": [[1 if c == "^" else 10 + ord(c) % 50 for c in t] for t in texts]}


def test_tokenize_adds_bos_once():
    ids, _, _ = tokenize_prompts(_BosTokenizer(), ["abc", "^abc"], 10)
    assert ids[0] == ids[1] and ids[0][0] == 1 and ids[0].count(1) == 1
    (cut,), _, _ = tokenize_prompts(_BosTokenizer(), ["abcdefgh"], 4, long_prompts="truncate")
    assert cut[0] == 1 and len(cut) == 4 and cut[1:] == [10 + ord(c) % 50 for c in "fgh"]


# --------------------------------------------------------------------------------------------- sampling


def test_sampler_is_deterministic_and_covers_each_epoch():
    draws = [PromptSampler(10, seed=3).next_batch(4) for _ in range(2)]
    assert draws[0] == draws[1]
    sampler = PromptSampler(10, seed=3)
    stream = [i for _ in range(10) for i in sampler.next_batch(4)]  # 40 = 4 epochs, batches span epochs
    epochs = [stream[j:j + 10] for j in range(0, 40, 10)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # a fresh permutation each epoch
    assert stream != [i for _ in range(10) for i in PromptSampler(10, seed=4).next_batch(4)]
    assert PromptSampler(5, shuffle=False).next_batch(7) == [0, 1, 2, 3, 4, 0, 1]


def test_sampler_resumes_exactly():
    full = PromptSampler(7, seed=1)
    expected = [full.next_batch(3) for _ in range(8)]
    first = PromptSampler(7, seed=1)
    head = [first.next_batch(3) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint stores it as JSON
    resumed = PromptSampler(7, seed=999)  # the saved seed wins
    resumed.load_state_dict(state)
    assert head + [resumed.next_batch(3) for _ in range(5)] == expected
    with pytest.raises(MinioprdError, match="7 prompts"):
        PromptSampler(8).load_state_dict(state)
