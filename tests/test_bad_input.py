"""Table of bad inputs: each is exit code 2, one line naming the problem, no traceback, nothing earlier changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from minioprd.cli import app

RECIPE = str(Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml")
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dirs):
    """A finished run (whose files must never change) and a set of bad files."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    r = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(run), "--steps", "2"])
    assert r.exit_code == 0, r.output
    (root / "nofield.jsonl").write_text('{"text": "hi"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "notes.txt").write_text("hello\n")
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "prompts.jsonl").write_text('{"prompt": "What is 1+1?"}\n{"prompt": "What is 2+2?"}\n')
    (root / "nomodel").mkdir()
    shutil.copytree(run / "adapter", root / "adapterdir")
    other = root / "other-teacher"  # the tiny teacher with a foreign tokenizer config: ids mismatch
    shutil.copytree(tiny_dirs["teacher"], other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    from test_cross_tokenizer import other_tokenizer

    other_tokenizer().save_pretrained(other)
    return root, run


CASES = [
    # (arguments after `distill -r tiny-cpu.yaml -o NEW`, text the one line must contain)
    (["--student", "/no/such/model"], "student path '/no/such/model' does not exist"),
    (["--teacher", "./missing-teacher"], "teacher path './missing-teacher' does not exist"),
    (["--student", "{root}/nomodel"], "has no config.json"),
    (["--student", "{root}/adapterdir"], "looks like a LoRA adapter"),
    (["--teacher", "Qwen2.5-7B"], "not in the local Hugging Face cache"),
    (["--student", "NotAModel"], "unknown student 'NotAModel'"),
    (["loss.knd=mse"], "did you mean 'kind'"),
    (["trian.steps=3"], "unknown config section 'trian'"),
    (["train.steps=many"], "train.steps: expected an integer"),
    (["train.lr=-1"], "train.lr must be > 0"),
    (["rollout.top_p=1.5"], "rollout.top_p must be <= 1.0"),
    (["loss.positions=middle"], "loss.positions must be one of"),
    (["loss.kind=l1"], "loss.kind must be one of"),
    (["train.lr=0", "rollout.n=0", "lora.dropout=2"], "3 problems in the config"),
    (["notanoverride"], "is not section.key=value"),
    (["loss.layers=[9]"], "layers 1..2"),
    (["loss.teacher_layers=[1]"], "one teacher layer per student layer"),
    (["data.prompt_template=nothing"], "must contain {prompt}"),
    (["--device", "cuda"], "CUDA is not available"),
    (["lora.target_modules=[nope_proj]"], "target_modules"),
    (["--dataset", "{root}/missing.jsonl"], "missing.jsonl"),
    (["--dataset", "{root}/nofield.jsonl"], "--field"),
    (["--dataset", "{root}/prompts.jsonl", "--field", "question"], "has no column 'question'"),
    (["--dataset", "{root}/empty.jsonl"], "empty.jsonl"),
    (["--dataset", "{root}/notes.txt"], "notes.txt"),
    (["--dataset", "{root}/prompts.jsonl", "data.max_prompt_tokens=2"], "longer than"),
    (["--teacher", "{root}/other-teacher", "loss.objective=opd_topk", "model.teacher_quant=none"],
     "needs a shared vocabulary"),
    (["train.report_to=[mlflow]"], "train.report_to"),
    (["--recipe", "{root}/bad.yaml"], "is not valid YAML"),
    (["--recipe", "{root}/list.yaml"], "must be a mapping"),
    (["--recipe", "{root}/nope.yaml"], "not found"),
    (["--resume", "{root}/nomodel"], "not a minioprd run directory"),
    (["loss.bridge={root}/nomodel", "model.teacher_quant=none"], "bridge"),
    (["train.eval_every=2", "eval.holdout=0"], "nothing to evaluate on"),
    (["-o", "{root}/notes.txt"], "'{root}/notes.txt' is a file, not a directory"),
    (["-o", "{root}/notes.txt/run"], "'{root}/notes.txt' is a file, not a directory"),
]


@pytest.mark.parametrize("args,expected", CASES, ids=[c[1][:40] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, args, expected):
    root, run = world
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = [a.replace("{root}", str(root)) for a in args]
    out = root / "new-run"
    result = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:") and expected.replace("{root}", str(root)) in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not (out / "metrics.jsonl").exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_existing_run_is_refused_and_kept(world):
    root, run = world
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(run), "--steps", "3"])
    assert result.exit_code == 2 and "already holds a run with another config" in result.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_output_dir_naming_a_file_leaves_the_file_alone(world):
    root, _ = world
    before = (root / "notes.txt").read_bytes()
    result = runner.invoke(app, ["distill", "-r", RECIPE, "-o", str(root / "notes.txt"), "--steps", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (root / "notes.txt").read_bytes() == before


def test_4bit_teacher_whose_width_is_not_a_multiple_of_64_runs_on_cpu(tmp_path, tiny_dirs):
    """bitsandbytes' CPU 4-bit kernel cannot pack a 96-wide Linear (it used to fail in the first teacher forward
    with `shape '[96, 1]' is invalid for input of size 144`): those stay unquantized, the rest is NF4."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from minioprd.models import load_teacher, resolve_model

    vocab = AutoConfig.from_pretrained(tiny_dirs["teacher"]).vocab_size
    tok = AutoTokenizer.from_pretrained(tiny_dirs["teacher"])
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "t96")
    tok.save_pretrained(tmp_path / "t96")
    notes: list[str] = []
    teacher = load_teacher(resolve_model(str(tmp_path / "t96"), "teacher"), "4bit", "cpu", log=notes.append)
    block = teacher.model.layers[0]
    assert type(block.mlp.down_proj).__name__ == "Linear4bit"  # 256 -> 96: packable, stays NF4
    assert type(block.self_attn.q_proj) is torch.nn.Linear and type(block.mlp.gate_proj) is torch.nn.Linear
    assert len(notes) == 1 and "12 of the teacher's 14 linear layers" in notes[0]
    with torch.no_grad():
        logits = teacher(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    result = runner.invoke(app, ["distill", "-r", RECIPE, "--teacher", str(tmp_path / "t96"), "-o",
                                 str(tmp_path / "run"), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "the rest is NF4" in result.output and (tmp_path / "run" / "adapter").is_dir()


def test_there_are_at_least_25_cases():
    assert len(CASES) + 1 >= 25


@pytest.mark.parametrize("args, expected", [
    (["eval", "-m", "builtin:tiny-student", "--k", "0", "--top-p", "2", "--dtype", "fp8", "--device", "tpu"],
     ["--k must be >= 1, got 0", "--top-p must be <= 1.0, got 2.0", "--dtype must be one of", "--device must be",
      "pass --dataset", "pass --output-dir"]),
    (["eval", "--teacher", "builtin:tiny-teacher", "-m", "builtin:tiny-student", "-d", "x", "-o", "y",
      "--greedy", "--k", "4"], ["identical samples", "two commands"]),
    (["bridge", "--rank", "0", "--init", "magic", "--align", "loose", "--max-rows", "1"],
     ["--rank must be >= 1, got 0", "--init must be one of lstsq, random", "--align must be one of cover, exact",
      "--max-rows must be >= 2", "pass --output", "pass --teacher, --student and --dataset"]),
])
def test_eval_and_bridge_report_every_problem_at_once(args, expected, tmp_path):
    """`eval` and `bridge` check their config dataclasses (config.py) before loading anything: one line, every
    problem, each naming the flag and the value."""
    r = runner.invoke(app, args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    for text in expected:
        assert text in lines[0], (text, lines[0])
