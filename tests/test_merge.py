"""`minioprd merge`: a tiny LoRA (and QLoRA) run merged into a standalone model, checked against base+adapter
computed here independently, loaded without peft, and the safety rules (overwrite, atomicity, bad inputs)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minioprd.errors import MinioprdError

torch.set_num_threads(1)

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 300, 64, 2, 128]])


def _make_run(root: Path, base: Path, quant: str = "none", dora: bool = False) -> Path:
    """RUN_DIR/adapter as distill writes it: PEFT files, tokenizer, minioprd.json, projections."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minioprd.models import quantization_config

    kw: dict = {"dtype": torch.float32}
    if quant == "4bit":
        kw.update(device_map={"": "cpu"}, quantization_config=quantization_config("4bit", torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(base, **kw)
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora))
    for name, p in pm.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter actually change the outputs
            torch.nn.init.normal_(p, std=0.05)
    adapter = root / "adapter"
    pm.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    (adapter / "minioprd.json").write_text(json.dumps({
        "format": 1, "student": "builtin:tiny-student", "student_path": str(base), "student_quant": quant,
        "teacher": "builtin:tiny-teacher", "layer_map": [[1, 2], [2, 4]], "projections": True,
        "minioprd_version": "0.1.0"}))
    save_file({"s1_t2.weight": torch.randn(128, 64), "s2_t4.weight": torch.randn(128, 64)},
              str(adapter / "projections.safetensors"))
    (root / "metrics.jsonl").write_text("{}\n")
    return root


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dirs) -> Path:
    return _make_run(tmp_path_factory.mktemp("run"), tiny_dirs["student"])


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_dirs) -> Path:
    return _make_run(tmp_path_factory.mktemp("qrun"), tiny_dirs["student"], quant="4bit")


@pytest.fixture(scope="module")
def reference(lora_run, tiny_dirs) -> dict[str, torch.Tensor]:
    """Logits of base alone and of base+adapter (unmerged peft, fp32), computed without minioprd.merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"], dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(IDS).logits.float()
        both = PeftModel.from_pretrained(base, str(lora_run / "adapter")).eval()(IDS).logits.float()
    return {"base": plain, "adapter": both}


@pytest.fixture(scope="module")
def merged_bf16(lora_run, tmp_path_factory) -> tuple[Path, dict]:
    from minioprd.merge import merge_adapter

    out = tmp_path_factory.mktemp("m") / "bf16"
    return out, merge_adapter(lora_run / "adapter", out, dtype="bf16", log=lambda m: None)


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits.float()


def _hashes(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def _cli(*args: str):
    from typer.testing import CliRunner

    from minioprd.cli import app

    return CliRunner().invoke(app, ["merge", *args])


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_merge_reproduces_base_plus_adapter(dtype, lora_run, reference, merged_bf16, tmp_path):
    from safetensors import safe_open

    from minioprd.merge import RTOL, merge_adapter

    if dtype == "bf16":
        out, report = merged_bf16
    else:
        out = tmp_path / dtype
        report = merge_adapter(lora_run / "adapter", out, dtype=dtype, log=lambda m: None)
    assert report["verified"] and report["max_abs_diff"] <= report["tolerance"]
    assert not report["dequantized"]
    assert RTOL[dtype] <= report["tolerance"] <= 5 * RTOL[dtype]  # relative to a logit scale of at least 1
    # Against an fp32 reference computed here (2 layers, so tighter than the library's depth-proof tolerance):
    got = _logits(out)
    tol = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 4e-2}[dtype]
    assert float((got - reference["adapter"]).abs().max()) <= tol
    assert float((got - reference["base"]).abs().max()) > 5 * tol  # the adapter really is in the weights
    want = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}[dtype]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {want}
    assert json.loads((out / "config.json").read_text())["dtype"] == {"F32": "float32", "BF16": "bfloat16",
                                                                     "F16": "float16"}[want]


def test_output_is_standalone(merged_bf16, lora_run):
    """Loads with transformers while peft cannot be imported; nothing in OUT refers to LoRA/adapter/projections."""
    out, _ = merged_bf16
    code = ("import sys; sys.modules['peft'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
            "assert t.chat_template and sys.modules['peft'] is None\n"
            "print(type(m).__name__, len(t.apply_chat_template([{'role': 'user', 'content': 'hi'}])))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("Qwen2ForCausalLM ")
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "projections.safetensors",
                        "minioprd.json"}
    for f in out.iterdir():
        text = f.read_bytes().lower()
        for word in (b"lora", b"adapter", b"projection", b"peft", b"quantization"):
            assert word not in text, (f.name, word)
    from transformers import AutoTokenizer

    src = AutoTokenizer.from_pretrained(lora_run / "adapter")
    assert AutoTokenizer.from_pretrained(out).chat_template == src.chat_template


def test_qlora_merges_into_dequantized_base(qlora_run, tiny_dirs, tmp_path):
    """student_quant=4bit: the export holds dequantized-NF4 W + ΔW as floats, not 4-bit and not the fp32 W."""
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from minioprd.merge import merge_adapter
    from minioprd.models import quantization_config

    logs: list[str] = []
    out = tmp_path / "q"
    report = merge_adapter(qlora_run, out, dtype="fp32", log=logs.append)  # the run dir: adapter/ is found
    assert report["dequantized"] and report["verified"]
    assert report["max_abs_diff"] <= report["tolerance"]
    assert sum("dequantized" in line for line in logs) == 1
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    merged = load_file(str(out / "model.safetensors"))
    assert not any(k.endswith(("absmax", "quant_map", "nf4")) for k in merged)

    # Independent expectation for one layer: dequant(NF4(W)) + (alpha/r)·B·A from the raw adapter tensors.
    q4 = AutoModelForCausalLM.from_pretrained(tiny_dirs["student"], dtype=torch.float32, device_map={"": "cpu"},
                                              quantization_config=quantization_config("4bit", torch.bfloat16))
    w4 = q4.model.layers[0].mlp.down_proj.weight
    w_nf4 = bnbf.dequantize_4bit(w4.data, w4.quant_state).float()
    ad = load_file(str(qlora_run / "adapter" / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.0.mlp.down_proj"
    delta = (ad[f"{pre}.lora_B.weight"].float() @ ad[f"{pre}.lora_A.weight"].float()) * (8 / 4)
    got = merged["model.layers.0.mlp.down_proj.weight"]
    assert torch.allclose(got, w_nf4 + delta, atol=1e-6)
    original = load_file(str(tiny_dirs["student"] / "model.safetensors"))
    assert (got - (original["model.layers.0.mlp.down_proj.weight"] + delta)).abs().max() > 1e-3  # not the fp32 W
    assert torch.equal(merged["model.embed_tokens.weight"], original["model.embed_tokens.weight"])  # never 4-bit

    # A base saved in 4-bit (an "-bnb-4bit" checkpoint) is dequantized too, without any minioprd.json hint.
    q4.save_pretrained(tmp_path / "base4")
    foreign = tmp_path / "foreign"
    shutil.copytree(qlora_run / "adapter", foreign, ignore=shutil.ignore_patterns("minioprd.json"))
    logs.clear()
    report = merge_adapter(foreign, tmp_path / "q2", base=str(tmp_path / "base4"), dtype="fp32", log=logs.append)
    assert report["dequantized"] and report["verified"] and any("checkpoint is 4-bit" in m for m in logs)
    again = load_file(str(tmp_path / "q2" / "model.safetensors"))
    assert again.keys() == merged.keys() and all(torch.equal(again[k], merged[k]) for k in merged)


def test_overwrite_protection_and_force(lora_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = _cli("--adapter", str(lora_run / "adapter"), "--output", str(out))
    assert res.exit_code == 2
    assert "--force" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    res = _cli("--adapter", str(lora_run), "--output", str(out), "--force", "--dtype", "fp32")  # RUN_DIR works
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert "done:" in res.stdout and "max |Δlogit|" in res.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_idempotent_and_sharded(lora_run, merged_bf16, tmp_path):
    """Same inputs, same bytes: every file of two merges is identical; small shards load to the same logits."""
    from minioprd.merge import merge_adapter

    out, _ = merged_bf16
    again = tmp_path / "again"
    merge_adapter(lora_run / "adapter", again, dtype="bf16", log=lambda m: None)
    assert _hashes(again) == _hashes(out)
    sharded = tmp_path / "sharded"
    report = merge_adapter(lora_run / "adapter", sharded, dtype="bf16", max_shard_size="60KB", verify=False,
                           log=lambda m: None)
    assert report["shards"] > 1 and (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) == report["shards"]
    assert torch.equal(_logits(sharded), _logits(out))


@pytest.mark.parametrize("case", ["missing", "no_config", "damaged", "mismatch", "dtype", "inside"])
def test_bad_inputs_exit_2_with_one_line(case, lora_run, tiny_dirs, tmp_path):
    adapter, extra = str(lora_run / "adapter"), []
    out = str(tmp_path / "out")
    if case == "missing":
        adapter = str(tmp_path / "nope" / "adapter")
    elif case == "no_config":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "adapter_model.safetensors").write_bytes(b"")
        adapter = str(tmp_path / "empty")
    elif case == "damaged":  # a run killed while saving: truncated adapter weights
        shutil.copytree(lora_run / "adapter", tmp_path / "cut")
        blob = (tmp_path / "cut" / "adapter_model.safetensors").read_bytes()
        (tmp_path / "cut" / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
        adapter = str(tmp_path / "cut")
    elif case == "mismatch":  # trained on the width-64 student, merged into the width-128 teacher
        extra = ["--base", str(tiny_dirs["teacher"])]
    elif case == "dtype":
        extra = ["--dtype", "int4"]
    elif case == "inside":  # --force onto the run dir would delete the adapter itself
        out, extra = str(lora_run), ["--force"]
    res = _cli("--adapter", adapter, "--output", out, *extra)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.output
    assert not Path(out).exists() or case == "inside"
    want = {"missing": "does not exist", "no_config": "adapter_config.json", "damaged": "damaged", "mismatch": "--base",
            "dtype": "bf16", "inside": "choose another --output"}[case]
    assert want in lines[0]
    assert (lora_run / "adapter" / "adapter_config.json").is_file()


def test_failed_verification_leaves_output_untouched(lora_run, tmp_path, monkeypatch):
    import minioprd.merge as m

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    monkeypatch.setitem(m.RTOL, "fp16", 0.0)  # any rounding at all now counts as a failure
    with pytest.raises(MinioprdError, match="verification failed"):
        m.merge_adapter(lora_run / "adapter", out, dtype="fp16", force=True, log=lambda s: None)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_dora_adapter_merges(tiny_dirs, tmp_path):
    from minioprd.merge import merge_adapter

    run = _make_run(tmp_path / "run", tiny_dirs["student"], dora=True)
    report = merge_adapter(run, tmp_path / "out", dtype="fp32", log=lambda m: None)
    assert report["verified"] and report["max_abs_diff"] < 1e-4 < report["adapter_effect"]


def test_push_to_hub_needs_network_and_fails_before_work(lora_run, tmp_path, monkeypatch):
    from minioprd.merge import merge_adapter

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MinioprdError, match="HF_HUB_OFFLINE"):
        merge_adapter(lora_run / "adapter", tmp_path / "o", push_to_hub="someone/model", log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_parse_size():
    from minioprd.merge import parse_size

    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5GiB") == 3 * 2**29 and parse_size(4096) == 4096
    assert parse_size("500mb") == 5 * 10**8
    with pytest.raises(MinioprdError):
        parse_size("lots")


# ------------------------------------------------------------------------------------ real-size memory check

BENCH = os.environ.get("MINIOPRD_MERGE_BENCH", "")  # 0.5B, 1.5B, 3B or 7B: Qwen2.5 shapes, random weights
# (hidden, intermediate, layers, heads, kv heads, vocab rows, tied embeddings)
QWEN25 = {"0.5B": (896, 4864, 24, 14, 2, 151936, True), "1.5B": (1536, 8960, 28, 12, 2, 151936, True),
          "3B": (2048, 11008, 36, 16, 2, 151936, True), "7B": (3584, 18944, 28, 28, 4, 152064, False)}


def _random_checkpoint(size: str, out: Path) -> None:
    """A bf16 checkpoint with Qwen2.5-`size` shapes, written tensor by tensor (never the whole model in RAM)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen2Config

    from minioprd.builtin.tiny import build_tokenizer

    h, inter, layers, heads, kv, rows, tied = QWEN25[size]
    cfg = Qwen2Config(vocab_size=rows, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768,
                      rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied, eos_token_id=2, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()
                  if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    groups: list[list[str]] = [[]]
    size_b = 0
    for k, shp in shapes.items():
        if groups[-1] and size_b + shp.numel() * 2 > 4 * 10**9:
            groups.append([])
            size_b = 0
        groups[-1].append(k)
        size_b += shp.numel() * 2
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.ones(shapes[k]) if k.endswith("norm.weight") else torch.zeros(shapes[k])
                       if k.endswith("bias") else torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16)
                   for k in keys}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(out)
    build_tokenizer().save_pretrained(out)


def _random_adapter(base: Path, out: Path) -> None:
    """A random r=16 all-linear LoRA for `base`, built on the meta device (the base weights are never loaded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    for mod in pm.modules():
        for attr, std in (("lora_A", None), ("lora_B", 0.02)):
            parts = getattr(mod, attr, None)
            if isinstance(parts, torch.nn.ModuleDict) and "default" in parts:
                lin = parts["default"]
                s = std or lin.weight.shape[1] ** -0.5
                lin.weight = torch.nn.Parameter(torch.randn(lin.weight.shape, generator=g) * s)
    pm.save_pretrained(out)
    (out / "minioprd.json").write_text(json.dumps({"format": 1, "student": str(base), "student_path": str(base),
                                                   "student_quant": "none", "minioprd_version": "0.1.0"}))


@pytest.mark.slow
@pytest.mark.skipif(not BENCH, reason="set MINIOPRD_MERGE_BENCH=0.5B|1.5B|3B|7B to merge a real-size model")
def test_big_merge_memory(tmp_path):
    """Real shapes, random weights: the merge runs from a fresh process and its non-file-backed peak stays near
    one shard, not one model. Reuses base/adapter under $MINIOPRD_MERGE_BENCH_DIR (default: a temp dir)."""
    import re

    root = Path(os.environ.get("MINIOPRD_MERGE_BENCH_DIR", tmp_path)) / BENCH
    base, adapter, out = root / "base", root / "adapter", root / "merged"
    if not (base / "model.safetensors.index.json").is_file():
        _random_checkpoint(BENCH, base)
    if not (adapter / "adapter_config.json").is_file():
        _random_adapter(base, adapter)
    cmd = [sys.executable, "-m", "minioprd.cli", "merge", "--adapter", str(adapter), "--output", str(out),
           "--dtype", "bf16", "--force"]
    print("\n$ " + " ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(res.stdout + res.stderr)
    assert res.returncode == 0
    m = re.search(r"peak RSS ([\d.]+) GiB \(([\d.]+) GiB not memory-mapped\)", res.stdout)
    model_gib = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**30
    assert float(m.group(2)) < 2 * 2e9 / 2**30 + 1.5  # ~ one 2 GB shard + libraries, whatever the model size
    print(f"model {model_gib:.1f} GiB; peak RSS {m.group(1)} GiB, of it not memory-mapped {m.group(2)} GiB")
    shutil.rmtree(out)
