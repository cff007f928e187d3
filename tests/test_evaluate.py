"""evaluate.py and `minioprd eval`: real generation with the toy models, controlled generation for accuracy,
resume, model specs (adapters, run dirs), presets on rows copied from ../shared/data, alignment, CLI errors."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Callable

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import minioprd.evaluate as ev
from minioprd.cli import app
from minioprd.data import load_examples
from minioprd.errors import MinioprdError
from minioprd.rollout import Rollout, eos_ids, response_mask_from

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
STUDENT, TEACHER = "builtin:tiny-student", "builtin:tiny-teacher"


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=160, force_terminal=False), buf


class FakeRollout:
    """Stands in for `rollout.rollout`: answers each prompt with `respond(prompt text)`, counts calls."""

    def __init__(self, respond: Callable[[str], str]):
        self.respond, self.calls, self.rows = respond, 0, 0

    def __call__(self, model, tokenizer, prompts, n=1, temperature=1.0, top_p=1.0, max_new_tokens=256,
                 pack_weights=False):
        self.calls += 1
        rows = [p for p in prompts for _ in range(n)]
        self.rows += len(rows)
        eos = eos_ids(model, tokenizer)
        batch = tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
        texts = [tokenizer.decode(r) for r in rows]
        answers = [tokenizer(self.respond(t), add_special_tokens=False)["input_ids"][:max_new_tokens - 1] + [eos[0]]
                   for t in texts]
        width = max(len(a) for a in answers)
        resp = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in answers])
        rmask = response_mask_from(resp, eos)
        return Rollout(torch.cat([batch["input_ids"], resp], 1),
                       torch.cat([batch["attention_mask"], rmask.long()], 1), rmask, batch["input_ids"].shape[1])


def _arithmetic_oracle(text: str) -> str:
    """Right (boxed) when a is even, wrong (an `Answer:` line) when odd, no answer when a % 3 == 0."""
    a, op, b = re.search(r"What is (\d+)([+-])(\d+)\?", text).groups()
    a, b = int(a), int(b)
    result = a + b if op == "+" else a - b
    if a % 3 == 0:
        return "I am not sure"
    return f"so the result is \\boxed{{{result}}}" if a % 2 == 0 else f"Answer: {result + 1}"


class Spy:
    """Wraps the real rollout and counts generate calls and rows."""

    def __init__(self):
        self.calls, self.rows = 0, 0
        self.real = ev.rollout

    def __call__(self, model, tokenizer, prompts, **kw):
        self.calls += 1
        self.rows += len(prompts) * kw.get("n", 1)
        return self.real(model, tokenizer, prompts, **kw)


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, tiny_dirs) -> Path:
    """A run directory as `distill` writes it: adapter/ with a random (non-zero) LoRA, tokenizer, minioprd.json
    and projections for the layer map [(1, 1), (2, 4)]."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("run")
    adapter = run / "adapter"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"], dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear",
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_dirs["student"]).save_pretrained(adapter)
    save_file({"s1_t1.weight": torch.randn(128, 64) * 0.1, "s2_t4.weight": torch.randn(128, 64) * 0.1},
              str(adapter / "projections.safetensors"))
    (adapter / "minioprd.json").write_text(json.dumps({
        "format": 1, "student": STUDENT, "student_path": str(tiny_dirs["student"]), "student_quant": "none",
        "teacher": TEACHER, "layer_map": [[1, 1], [2, 4]], "projections": True}))
    return run


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------- evaluate()


def test_tiny_models_end_to_end_then_resume(tmp_path, tiny_dirs, monkeypatch):
    """Two real toy models in one table; a rerun generates nothing and writes the same summary; k=3 adds one
    sample per problem."""
    spy = Spy()
    monkeypatch.setattr(ev, "rollout", spy)
    out = tmp_path / "eval"
    console, buf = _console()
    kw = dict(max_problems=3, max_new_tokens=6, batch_size=4, console=console)
    summary = ev.evaluate([STUDENT, TEACHER], "builtin:arithmetic", out, k=2, **kw)
    assert list(summary["models"]) == [STUDENT, TEACHER]
    assert spy.rows == 12 and spy.calls == 4  # 2 models x 3 problems x 2 samples, 4 per call
    m = summary["models"][STUDENT]
    for key in ("avg@2", "pass@1", "pass@2", "maj@2", "no_answer", "mean_length", "truncated", "distinct_4gram",
                "problems", "samples", "skipped_prompts"):
        assert key in m
    assert m["problems"] == 3 and m["samples"] == 6 and 1 <= m["mean_length"] <= 6
    assert m["avg@2"] == pytest.approx(0.0)  # random toy weights never box the right sum
    assert m["model"] == {"base": STUDENT, "adapter": None, "quant": "none"}
    assert summary["settings"]["temperature"] == 0.7 and summary["settings"]["top_p"] == 0.95
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = _samples(out)
    assert len(rows) == 12 and {r["model"] for r in rows} == {STUDENT, TEACHER}
    assert sorted((r["problem"], r["sample"]) for r in rows if r["model"] == STUDENT) == \
        [(p, s) for p in range(3) for s in range(2)]
    first = rows[0]
    assert {"prompt", "response", "extracted", "correct", "answer", "length", "truncated"} <= first.keys()
    assert first["prompt"].count("put your final answer within \\boxed{}") == 1
    assert first["prompt"].startswith("<|im_start|>user\nWhat is ")  # the chat template
    text = buf.getvalue()
    assert STUDENT in text and TEACHER in text and "avg@2" in text and "pass@2" in text

    spy.calls = spy.rows = 0
    again = ev.evaluate([STUDENT, TEACHER], "builtin:arithmetic", out, k=2, **kw)
    assert spy.calls == 0 and again == summary and len(_samples(out)) == 12

    more = ev.evaluate([STUDENT], "builtin:arithmetic", out, k=3, **kw)
    assert spy.rows == 3 and len(_samples(out)) == 15 and more["models"][STUDENT]["samples"] == 9


def test_controlled_generation_accuracy_metrics(tmp_path, monkeypatch):
    fake = FakeRollout(_arithmetic_oracle)
    monkeypatch.setattr(ev, "rollout", fake)
    examples = load_examples("builtin:arithmetic", split="test", max_rows=8)
    a = [int(e.meta["a"]) for e in examples]
    right = sum(x % 3 != 0 and x % 2 == 0 for x in a) / 8
    silent = sum(x % 3 == 0 for x in a) / 8
    assert 0 < right < 1 and 0 < silent < 1  # the first 8 test problems exercise all three kinds
    s = ev.evaluate([STUDENT], "builtin:arithmetic", tmp_path / "e", k=2, max_problems=8, max_new_tokens=40,
                    batch_size=5)["models"][STUDENT]
    assert s["avg@2"] == pytest.approx(right) and s["pass@2"] == pytest.approx(right)
    assert s["maj@2"] == pytest.approx(right) and s["no_answer"] == pytest.approx(silent)
    assert s["truncated"] == 0.0 and s["solve_all"] == round(right * 8)
    for r in _samples(tmp_path / "e"):
        x = a[r["problem"]]
        assert r["correct"] == (x % 3 != 0 and x % 2 == 0)
        assert (r["extracted"] is None) == (x % 3 == 0)
        assert r["answer"] == examples[r["problem"]].answer


def test_resume_drops_a_cut_line_and_refuses_other_settings(tmp_path, monkeypatch):
    fake = FakeRollout(_arithmetic_oracle)
    monkeypatch.setattr(ev, "rollout", fake)
    out = tmp_path / "e"
    kw = dict(k=1, max_problems=4, max_new_tokens=40, batch_size=8)
    first = ev.evaluate([STUDENT], "builtin:arithmetic", out, **kw)
    text = (out / "samples.jsonl").read_text()
    (out / "samples.jsonl").write_text(text[:-20])  # a crash cut the last line
    fake.rows = 0
    assert ev.evaluate([STUDENT], "builtin:arithmetic", out, **kw) == first
    assert fake.rows == 1 and len(_samples(out)) == 4  # only the cut sample was generated again
    with pytest.raises(MinioprdError, match="other settings.*temperature"):
        ev.evaluate([STUDENT], "builtin:arithmetic", out, **{**kw, "temperature": 1.0})


def test_adapter_and_run_dir_as_models(tmp_path, fake_run, tiny_dirs):
    spec = ev.parse_model_spec(str(fake_run))  # a run dir -> its adapter, on the run's student
    assert spec.adapter == fake_run / "adapter" and spec.base == str(tiny_dirs["student"]) and spec.quant == "none"
    assert ev.parse_model_spec(str(fake_run / "adapter")).adapter == fake_run / "adapter"
    explicit = ev.parse_model_spec(f"{STUDENT}+{fake_run / 'adapter'}@4bit")
    assert explicit.base == STUDENT and explicit.adapter == fake_run / "adapter" and explicit.quant == "4bit"

    summary = ev.evaluate([STUDENT, str(fake_run)], "builtin:arithmetic", tmp_path / "e", greedy=True,
                          max_problems=3, max_new_tokens=8)
    assert summary["models"][str(fake_run)]["model"]["adapter"] == str(fake_run / "adapter")
    rows = _samples(tmp_path / "e")
    base = [r["response"] for r in rows if r["model"] == STUDENT]
    tuned = [r["response"] for r in rows if r["model"] == str(fake_run)]
    assert len(base) == len(tuned) == 3 and base != tuned  # the adapter really changes the model


def test_model_spec_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MinioprdError, match="neither a model"):
        ev.parse_model_spec(str(tmp_path / "empty"))
    with pytest.raises(MinioprdError, match="does not exist"):
        ev.parse_model_spec(str(tmp_path / "missing" / "model"))
    with pytest.raises(MinioprdError, match="not a LoRA adapter"):
        ev.parse_model_spec(f"{STUDENT}+{tmp_path / 'empty'}")
    with pytest.raises(MinioprdError, match="given twice"):
        ev.evaluate([STUDENT, STUDENT], "builtin:arithmetic", tmp_path / "e")


# --------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset, answers", [
    ("aime24", ["204", "113"]),
    ("aimo", ["142.0", "144.0"]),
    ("math500", ["\\left( 3, \\frac{\\pi}{2} \\right)", "(3,4]", "(2,\\infty)"]),
    ("minerva", ["4.5e33", "1.6"]),
    ("olympiad", ["$\\frac{1}{2 n+2}$", "$(1,8,19), (2,7,13), (4,5,7)$"]),
    ("gsm8k", ["72", "1000"]),
])
def test_presets_read_the_shared_formats(preset, answers, tiny_tokenizer):
    examples = ev.load_eval_examples(str(FIXTURES / f"{preset}.jsonl"), preset=preset)
    assert [e.answer for e in examples] == answers
    task = ev.prepare_task(tiny_tokenizer, examples, prompt_suffix=ev.PRESETS[preset].suffix or ev.MATH_SUFFIX)
    for text in task.texts:  # AIMO's prompts already carry the instruction: never twice
        assert text.count("put your final answer within \\boxed{}") == 1


def test_preset_eval_grades_real_answers(tmp_path, monkeypatch):
    """AIMO rows (ground truth `142.0`) answered `\\boxed{142}` and MATH-500's tuple in another form."""
    replies = {"Irreducible fraction": "\\boxed{142}", "split the integers": "\\boxed{143}",
               "polar coordinates": "\\boxed{(3, \\pi/2)}"}

    def respond(text: str) -> str:
        return next((r for key, r in replies.items() if key in text), "no idea")

    monkeypatch.setattr(ev, "rollout", FakeRollout(respond))
    aimo = ev.evaluate([STUDENT], str(FIXTURES / "aimo.jsonl"), tmp_path / "a", preset="aimo", max_new_tokens=40)
    assert aimo["models"][STUDENT]["avg@1"] == pytest.approx(0.5)
    assert aimo["settings"]["prompt_suffix"] == "" and aimo["dataset"]["problems"] == 2
    math = ev.evaluate([STUDENT], str(FIXTURES / "math500.jsonl"), tmp_path / "m", preset="math500",
                       max_new_tokens=40, max_problems=1)
    assert math["models"][STUDENT]["avg@1"] == 1.0


# --------------------------------------------------------------------------------------------- in-loop


def test_evaluate_task_keeps_mode_and_rng(tiny_dirs, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"], dtype=torch.float32)
    model.train()
    examples = load_examples("builtin:arithmetic", split="test", max_rows=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m = ev.evaluate_task(model, tiny_tokenizer, examples, k=1, greedy=True, max_new_tokens=5, batch_size=2,
                         return_samples=True)
    assert model.training  # left as it was
    assert torch.equal(torch.get_rng_state(), state)  # the training run's random stream is untouched
    assert m["problems"] == 3 and "avg@1" in m and len(m["samples"]) == 3
    task = ev.prepare_task(tiny_tokenizer, examples)
    again = ev.evaluate_task(model, tiny_tokenizer, task, k=1, greedy=True, max_new_tokens=5, return_samples=True)
    assert [s["response"] for s in again["samples"]] == [s["response"] for s in m["samples"]]
    sampled = ev.evaluate_task(model, tiny_tokenizer, task, k=2, greedy=False, max_new_tokens=5)
    assert sampled["samples"] == 6 and "pass@2" in sampled


# --------------------------------------------------------------------------------------------- CLI


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    base = ["eval", "-d", "builtin:arithmetic", "-o", str(tmp_path / "e")]
    line = _one_error_line(runner.invoke(app, base + ["-m", str(tmp_path / "no" / "such-model")]))
    assert "does not exist" in line
    line = _one_error_line(runner.invoke(app, ["eval", "-m", STUDENT, "-d", str(FIXTURES / "no_answers.jsonl"),
                                               "-o", str(tmp_path / "e")]))
    assert "no answer column" in line and "--answer-field" in line
    line = _one_error_line(runner.invoke(app, base + ["-m", STUDENT, "--preset", "aime26"]))
    assert "unknown preset" in line and "aime24" in line
    line = _one_error_line(runner.invoke(app, base + ["-m", STUDENT, "--greedy", "-k", "4"]))
    assert "greedy" in line
    assert "--model" in _one_error_line(runner.invoke(app, base))
    assert "--output-dir" in _one_error_line(runner.invoke(app, ["eval", "-m", STUDENT, "-d", "builtin:arithmetic"]))


def test_cli_eval_and_alignment(tmp_path, fake_run, monkeypatch):
    runner = CliRunner()
    monkeypatch.setattr(ev, "rollout", FakeRollout(_arithmetic_oracle))
    r = runner.invoke(app, ["eval", "-m", STUDENT, "-d", "builtin:arithmetic", "-o", str(tmp_path / "e"),
                            "--max-problems", "2", "--max-new-tokens", "40", "-k", "2"])
    assert r.exit_code == 0, r.output
    assert "avg@2" in r.output and json.loads((tmp_path / "e" / "summary.json").read_text())["settings"]["k"] == 2
    monkeypatch.undo()

    common = ["-d", "builtin:arithmetic", "--max-problems", "2", "--max-new-tokens", "6", "--teacher-quant", "none",
              "--greedy"]
    r = runner.invoke(app, ["eval", "--teacher", TEACHER, "--adapter", str(fake_run), "-o", str(tmp_path / "a")]
                      + common)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "a" / "alignment.json").read_text())["report"]
    assert rep["pairs"] == [[1, 1], [2, 4]] and len(rep["layer_cos"]) == 2 and rep["kl"] > 0
    assert "KL nats/tok" in r.output and "cosine per layer pair" in r.output
    r = runner.invoke(app, ["eval", "--teacher", TEACHER, "--student", STUDENT, "-o", str(tmp_path / "b")] + common)
    assert r.exit_code == 0, r.output
    before = json.loads((tmp_path / "b" / "alignment.json").read_text())["report"]
    assert before["layer_cos"] is None and before["kl"] > 0  # widths 64 vs 128, no projections before training
    assert "not comparable" in r.output
    line = _one_error_line(runner.invoke(app, ["eval", "--teacher", TEACHER, "-m", STUDENT, "-o", str(tmp_path / "c"),
                                               "-d", "builtin:arithmetic"]))
    assert "two commands" in line
