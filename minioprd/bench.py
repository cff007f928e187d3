"""`minioprd bench update|rollout|step`: costs measured side by side in one run (paper Table 3 and more).

`update`: the cost of one update step per objective.

For each objective, on identical fixed rollouts and precomputed teacher targets at the real shapes of a
chosen student (random weights, LoRA on all linear layers): time and peak-memory increase of the student's
forward + loss + backward + optimizer step. The teacher is of the student's architecture (the paper's
same-architecture setting), so no projections. CPU: each objective runs in a fresh subprocess and the peak
RSS increase is read from /proc (VmHWM after resetting it); CUDA: `torch.cuda.max_memory_allocated` increase.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from minioprd.memory import reset_peak, rss

# Student shapes for the bench: the planner's embedded configs (real config.json numbers), plus a toy.
BENCH_SHAPES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b",
                "qwen3-8b", "tiny")
ARCHS = BENCH_SHAPES  # names `--student` accepts
OBJECTIVES = ("oprd", "opd_sampled", "opd_topk", "opd_full")


def build_config(arch: str) -> Any:
    """A transformers config at the real shape of `arch` (random weights are built from it)."""
    from transformers import Qwen2Config, Qwen3Config

    from minioprd.catalog import EMBEDDED

    if arch == "tiny":
        return Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    s = EMBEDDED[arch]
    kw = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
              num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, tie_word_embeddings=s.tied,
              max_position_embeddings=32768)
    return Qwen3Config(head_dim=s.head_dim, **kw) if s.qk_norm else Qwen2Config(**kw)


def _sdpa_cpu_flop(q: Any, k: Any, v: Any, *_: Any, backward: bool = False) -> int:
    """(B, H, Tq, d) x (B, H, Tk, d): QK^T and PV, 2 FLOPs per multiply-add; backward does both twice over."""
    b, h, tq, d = q.shape
    flops = 2 * b * h * tq * k.shape[-2] * (d + v.shape[-1])
    return 2 * flops if backward else flops


def flop_counter() -> Any:
    """A dispatch mode that adds up matmul and attention FLOPs of everything run under it (autograd included).

    torch's FlopCounterMode also tracks modules, whose hooks fail on the OPD losses' chunk recomputation, and
    does not know the CPU flash-attention kernel; this uses its per-op formulas and adds that kernel.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    cpu_sdpa = {getattr(aten, n, None): n.endswith("backward") for n in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")}

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in flop_registry:
                self.total += flop_registry[packet](*args, **kwargs, out_val=out)
            elif packet in cpu_sdpa:
                qkv = args[1:4] if cpu_sdpa[packet] else args[:3]  # backward's first argument is grad_out
                self.total += _sdpa_cpu_flop(*qkv, backward=cpu_sdpa[packet])
            return out

    return _Count()


def measure_one(arch: str, objective: str, batch: int, prompt_len: int, response_len: int, steps: int,
                device: str, seed: int = 0, topk: int = 16, chunk: int = 512, lora_r: int = 16,
                threads: int = 0, gradient_checkpointing: bool = True, micro_batch: int = 0) -> dict[str, Any]:
    """One objective, in this process: returns seconds per update and peak-memory increase in MB.

    With `gradient_checkpointing` (as in every GPU recipe) only block inputs are kept for backward, so the
    backbone's activations stop dominating and what each objective adds on top becomes visible. With
    `micro_batch` (as `rollout.micro_batch` in distill) the `batch` sequences go through forward and backward
    that many at a time, gradients accumulating, before the one optimizer step.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from minioprd.capture import capture_hidden
    from minioprd.losses import OPD_LOSSES, representation_loss
    from minioprd.models import pick_dtype

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    dev = torch.device(device)
    dtype = pick_dtype("auto", dev)  # as distill: fp32 on a CPU, fp16 on a T4, bf16 on newer GPUs
    cfg = build_config(arch)
    with torch.device(dev):
        base = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if gradient_checkpointing:  # the same call models.load_student makes for lora.gradient_checkpointing
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student = get_peft_model(base, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"))
    student.train()
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    T = prompt_len + response_len
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (batch, T), generator=g).to(dev)
    attn = torch.ones_like(ids)
    pos = torch.arange(T, device=dev).expand(batch, T)
    lengths = torch.randint(response_len // 2, response_len + 1, (batch,), generator=g)
    mask = (torch.arange(response_len).unsqueeze(0) < lengths.unsqueeze(1)).to(dev)  # (B, R) ragged
    start, stop = prompt_len - 1, prompt_len - 1 + response_len  # predict convention
    tokens = ids[:, prompt_len:]
    # precomputed teacher targets: every layer for oprd, the final state (+ a frozen head) for OPD
    targets = [torch.randn(batch, response_len, D, generator=g).to(dev, dtype) for _ in range(L)] \
        if objective == "oprd" else [torch.randn(batch, response_len, D, generator=g).to(dev, dtype)]
    t_head = torch.nn.Linear(D, V, bias=False).to(dev, dtype).requires_grad_(False)
    s_head = student.get_output_embeddings()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    mb = micro_batch if 0 < micro_batch < batch else batch

    def update() -> None:
        for i in range(0, batch, mb):
            rows = slice(i, i + mb)
            if objective == "oprd":
                states = capture_hidden(student, ids[rows], attn[rows], pos[rows], list(range(1, L + 1)), start, stop)
                loss, _ = representation_loss([h.float() for h in states], [t[rows] for t in targets], mask[rows],
                                              kind="scale_mse")
            else:
                (h,) = capture_hidden(student, ids[rows], attn[rows], pos[rows], [L], start, stop)
                loss = OPD_LOSSES[objective](h.float(), targets[0][rows], tokens[rows], mask[rows],
                                             lambda x: s_head(x.to(dtype)), lambda x: t_head(x.to(dtype)),
                                             vocab_size=V, k=topk, chunk_size=chunk)
            # each part's share of the batch mean, as distill weights micro-batches: sequences for OPRD's
            # per-sequence mean (the last part may be short), tokens for OPD's token mean
            share = ids[rows].shape[0] / batch if objective == "oprd" else mask[rows].sum() / mask.sum()
            (loss * share).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # The warm-up step (it allocates optimizer state, so it is not timed) counts the matmul/attention FLOPs of
    # forward, recompute and backward: the work each objective asks for, whatever the machine.
    counter = flop_counter()
    with counter:
        update()
    times, peaks = [], []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            reset_peak()
            before = rss("VmRSS")
        t0 = time.perf_counter()
        update()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = rss("VmHWM") - before
        times.append(time.perf_counter() - t0)
        peaks.append(peak / 2**20)
    return {"objective": objective, "arch": arch, "device": device, "batch": batch, "prompt_len": prompt_len,
            "response_len": response_len, "seconds": sum(times) / steps, "peak_increase_mb": max(peaks),
            "gflop": counter.total / 1e9,
            "steps": steps, "topk": topk, "chunk": chunk, "gradient_checkpointing": gradient_checkpointing,
            "micro_batch": mb}


def _check(shapes: dict[str, str], objectives: tuple[str, ...]) -> None:
    """Every problem with the named shapes (flag -> value) and objectives, as one MinioprdError."""
    from minioprd.errors import MinioprdError

    problems = [f"unknown {flag} shape {v!r}: known are {', '.join(ARCHS)}" for flag, v in shapes.items()
                if v not in ARCHS]
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad:
        problems.append(f"unknown objective(s) {bad}: choose from {', '.join(OBJECTIVES)}")
    if problems:
        raise MinioprdError("; ".join(problems))


def run_update_bench(arch: str = "qwen2.5-0.5b", objectives: tuple[str, ...] = OBJECTIVES, batch: int = 4,
                     prompt_len: int = 64, response_len: int = 512, steps: int = 1, device: str = "cpu",
                     topk: int = 16, chunk: int = 512, threads: int = 0, gradient_checkpointing: bool = True,
                     micro_batch: int = 0, log: Any = print) -> dict[str, Any]:
    """Each objective in a fresh subprocess (so CPU peak RSS is its own); ratios against oprd."""
    from minioprd.errors import MinioprdError

    _check({"--student": arch}, objectives)
    if micro_batch < 0:
        raise MinioprdError(f"--micro-batch must be >= 0 (0 = the whole batch at once), got {micro_batch}")
    rows = []
    for obj in objectives:
        args = dict(arch=arch, objective=obj, batch=batch, prompt_len=prompt_len, response_len=response_len,
                    steps=steps, device=device, topk=topk, chunk=chunk, threads=threads,
                    gradient_checkpointing=gradient_checkpointing, micro_batch=micro_batch)
        code = ("import json,sys; from minioprd.bench import measure_one; "
                "print('RESULT'+json.dumps(measure_one(**json.loads(sys.argv[1]))))")
        # Large allocations via mmap, so freed tensors leave RSS at once and the peak tracks live memory
        # rather than glibc's heap high-water mark.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                              env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise MinioprdError(f"bench of {obj} failed: {tail}")
        rows.append(json.loads(line[6:]))
        log(f"{obj}: {rows[-1]['seconds']:.2f} s/update, +{rows[-1]['peak_increase_mb']:.0f} MB peak, "
            f"{rows[-1]['gflop']:,.4g} GFLOP")
    ref = next((r for r in rows if r["objective"] == "oprd"), None)
    for r in rows:
        if ref:
            r["time_vs_oprd"] = r["seconds"] / ref["seconds"]
            r["memory_vs_oprd"] = r["peak_increase_mb"] / max(ref["peak_increase_mb"], 1e-9)
            r["work_vs_oprd"] = r["gflop"] / max(ref["gflop"], 1e-9)
    return {"bench": "update", "arch": arch, "device": device, "threads": threads or os.cpu_count(),
            "gradient_checkpointing": gradient_checkpointing, "micro_batch": rows[0]["micro_batch"] if rows else 0,
            "machine": _machine(device), "rows": rows}


# `minioprd bench rollout` settings: each adds one speed-up to the one before; `bare_generate` is the reference.
ROLLOUT_SETTINGS: dict[str, dict[str, Any]] = {
    "plain": dict(cache="dynamic", compile=False, share_prefill=False, merge_lora=False, pack_weights=False),
    "shared": dict(cache="dynamic", compile=False, share_prefill=True, merge_lora=False, pack_weights=False),
    # CPU: weights packed for oneDNN with the adapter folded in (the default there at a real shape)
    "packed": dict(cache="dynamic", compile=False, share_prefill=True, merge_lora=False, pack_weights=True),
    "merged": dict(cache="dynamic", compile=False, share_prefill=True, merge_lora=True, pack_weights=False),
    "static": dict(cache="static", compile=False, share_prefill=True, merge_lora=True, pack_weights=False),
    "compiled": dict(cache="static", compile=True, share_prefill=True, merge_lora=True, pack_weights=False),
    "compiled_unmerged": dict(cache="static", compile=True, share_prefill=True, merge_lora=False,
                              pack_weights=False),
}
CPU_ONLY_SETTINGS = ("packed",)  # `--settings all` leaves these out on a GPU

# Memory bandwidth of GPUs by name (GB/s, vendors' figures); a card not listed is measured with a copy.
GPU_BANDWIDTH_GBS = {"T4": 320, "L4": 300, "A10G": 600, "A10": 600, "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935,
                     "A100": 1555, "H100 PCIe": 2000, "H100": 3350, "H200": 4800, "L40S": 864, "V100": 900,
                     "P100": 732, "RTX 3060": 360, "RTX 3070": 448, "RTX 3080": 760, "RTX 3090": 936,
                     "RTX 4060 Ti": 288, "RTX 4070": 504, "RTX 4080": 717, "RTX 4090": 1008, "RTX A4000": 448,
                     "RTX A6000": 768}


def copy_bandwidth(device: str, mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write counted), best of `repeats`: what the memory system delivers."""
    import torch

    a = torch.ones(mb * 2**18, device=device)  # mb MiB of fp32
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        if a.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def device_bandwidth(device: str) -> tuple[float, str]:
    """(bytes/s, where the figure comes from): a GPU's figure from GPU_BANDWIDTH_GBS, else a copy benchmark."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key in sorted(GPU_BANDWIDTH_GBS, key=len, reverse=True):  # the most specific name first
            if key in name:
                return GPU_BANDWIDTH_GBS[key] * 1e9, f"{name}: vendor figure {GPU_BANDWIDTH_GBS[key]} GB/s"
        return copy_bandwidth(device), f"{name}: not in the table, measured with a copy"
    return copy_bandwidth(device), "measured with a copy benchmark"


def decode_step_bytes(model: Any, rows: int, context: float) -> float:
    """Bytes one decode step must read: every weight once (the tied embedding once, as the LM head) and the KV
    cache of `rows` sequences at `context` positions."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # shared (tied) ones once
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elt = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    kv = cfg.num_hidden_layers * 2 * rows * cfg.num_key_value_heads * head_dim * elt * context
    return weights + kv


def run_rollout_bench(arch: str = "qwen2.5-0.5b", batch: int = 4, prompt_len: int = 64, new_tokens: int = 128,
                      device: str = "cpu", repeats: int = 2, threads: int = 0, n: int = 2,
                      settings: tuple[str, ...] = tuple(ROLLOUT_SETTINGS), log: Any = print) -> dict[str, Any]:
    """Tokens/s and decode steps/s of minioprd's rollout under each setting vs a bare `generate`, on the same
    LoRA model (random weights at the real shape of `arch`) and prompts, with the bandwidth bound.

    `batch` prompts x `n` responses x `new_tokens` (random weights never pick EOS: equal work everywhere). Each
    setting runs once untimed (its first call compiles where it compiles), then `repeats` rounds time every
    setting in turn, each call from the same seed, so its tokens can be compared with bare generate's; the best
    round counts. The bound: a decode step cannot be faster than reading every weight and the KV cache once
    from memory; `fraction_of_bound` is the decode steps/s reached (prefill included) over that bound.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from minioprd.errors import MinioprdError
    from minioprd.models import pick_dtype
    from minioprd.rollout import rollout, rollout_notes

    bad = [s for s in settings if s not in ROLLOUT_SETTINGS]
    if bad or not settings:
        raise MinioprdError(f"unknown --settings {','.join(bad) or '(none)'}: choose from all, "
                            f"{', '.join(ROLLOUT_SETTINGS)}")
    if min(batch, n, prompt_len, new_tokens, repeats) < 1:
        raise MinioprdError(f"--batch, --n, --prompt-len, --response-len and --repeats must be >= 1, got {batch}, "
                            f"{n}, {prompt_len}, {new_tokens}, {repeats}")
    _check({"--student": arch}, ())
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    cfg = build_config(arch)
    dev = torch.device(device)
    dtype = pick_dtype("auto", dev)  # as distill: fp32 on a CPU, fp16 on a T4, bf16 on newer GPUs
    with torch.device(dev):
        base = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    with torch.no_grad():  # peft starts B at zero: make the adapter change the outputs, as after some training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)

    class Tok:  # just enough tokenizer for rollout(): left padding of equal-length prompts
        pad_token_id, eos_token_id = 0, None

        def pad(self, batch: dict, **_: Any) -> dict:
            t = torch.tensor(batch["input_ids"])
            return {"input_ids": t, "attention_mask": torch.ones_like(t)}

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, cfg.vocab_size, (batch, prompt_len), generator=g)
    rows = batch * n
    model.generation_config.eos_token_id = None  # random weights: never stop early, equal work per setting

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> torch.Tensor:
        ids = prompts.repeat_interleave(n, 0).to(dev)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=True, top_k=0, pad_token_id=0, use_cache=True)
        return out[:, prompt_len:]

    def ours(setting: dict[str, Any]) -> torch.Tensor:
        opts = {k: v for k, v in setting.items() if k != "merge_lora"}
        if setting["merge_lora"]:
            model.merge_adapter()
        try:
            return rollout(model, Tok(), prompts.tolist(), n=n, max_new_tokens=new_tokens, **opts).responses
        finally:
            if setting["merge_lora"]:
                model.unmerge_adapter()

    bandwidth, source = device_bandwidth(device)
    names = ("bare_generate", *settings)
    runs = {name: bare if name == "bare_generate" else (lambda s=ROLLOUT_SETTINGS[name]: ours(s)) for name in names}
    first, times, outputs = {}, {name: [] for name in names}, {}

    def timed(name: str) -> float:
        torch.manual_seed(0)  # the same seed for every call: equal tokens show the rollout unchanged
        sync()
        t0 = time.perf_counter()
        outputs[name] = runs[name]()
        sync()
        return time.perf_counter() - t0

    for name in names:  # warm-up; compiles where the setting compiles
        first[name] = timed(name)
        log(f"{name}: first call {first[name]:.1f} s")
    for _ in range(repeats):  # interleaved, so a busy spell on a shared machine hits every setting alike
        for name in names:
            times[name].append(timed(name))
    if "measured" in source:  # measured again after the runs; the better figure is the less disturbed one
        bandwidth = max(bandwidth, device_bandwidth(device)[0])
    step_bytes = decode_step_bytes(model, rows, prompt_len + new_tokens / 2)
    bound = bandwidth / step_bytes  # decode steps/s
    log(f"bandwidth {bandwidth / 1e9:.1f} GB/s ({source}); a decode step reads {step_bytes / 1e9:.3f} GB: "
        f"bound {bound:.2f} steps/s = {bound * rows:.1f} tokens/s")
    results = []
    for name in names:
        seconds, steps = min(times[name]), outputs[name].shape[1]  # best of the repeats: least disturbed
        ref, out = outputs["bare_generate"], outputs[name]
        results.append({
            "setting": name, "options": ROLLOUT_SETTINGS.get(name), "seconds": seconds, "all_seconds": times[name],
            "first_call_s": first[name], "tokens": rows * steps, "decode_steps": steps,
            "tokens_per_s": rows * steps / seconds, "decode_steps_per_s": steps / seconds,
            "fraction_of_bound": steps / seconds / bound,
            "speedup_vs_bare": min(times["bare_generate"]) / seconds,
            # share of tokens equal to bare generate's from the same seed (1.0: the speed-ups changed nothing)
            "same_tokens_as_bare": float((out == ref).float().mean()) if out.shape == ref.shape else 0.0})
        log(f"{name}: {results[-1]['tokens_per_s']:.1f} tokens/s, {steps / seconds:.2f} decode steps/s "
            f"({100 * results[-1]['fraction_of_bound']:.0f}% of the bound), {results[-1]['speedup_vs_bare']:.2f}x bare")
    fastest = max(results[1:] or results, key=lambda r: r["tokens_per_s"])
    return {"bench": "rollout", "arch": arch, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "machine": _machine(device), "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "prompts": batch, "n": n, "rows": rows, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "repeats": repeats, "bandwidth_gb_s": bandwidth / 1e9, "bandwidth_source": source,
            "bytes_per_decode_step": step_bytes, "bound_decode_steps_per_s": bound,
            "bound_tokens_per_s": bound * rows, "tokens_per_s": {r["setting"]: r["tokens_per_s"] for r in results},
            "rows_by_setting": results, "fastest": fastest["setting"],
            "fastest_speedup_vs_bare": fastest["speedup_vs_bare"], "notes": rollout_notes(model)}


def _random_model_dir(arch: str, out: Path, tok: Any, seed: int) -> Path:
    """A model directory with random weights at the real shape of `arch` and the given tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = build_config(arch)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return out


def run_step_bench(arch: str = "qwen2.5-0.5b", teacher: str = "", objectives: tuple[str, ...] = ("oprd",),
                   batch: int = 4, prompt_len: int = 64, response_len: int = 128, steps: int = 2,
                   device: str = "cpu", teacher_quant: str = "none", gradient_checkpointing: bool = True,
                   threads: int = 0, processes: int = 1, log: Any = print) -> dict[str, Any]:
    """Whole distillation steps through `distill()` itself, on random models at real shapes: seconds and share of
    rollout / teacher forward / student update per step (the first step is a warm-up and not counted).
    `processes` > 1: each objective also runs data-parallel in that many processes (`accelerate launch`, the same
    global batch of `batch` prompts), side by side with one process; `speedup` is the ratio of seconds per step.

    Random weights never choose the end token on purpose, so every response is `response_len` long and the
    work per step is fixed. The teacher defaults to the student's shape (the paper's same-architecture case).
    """
    import tempfile

    from minioprd.config import load_config
    from minioprd.distill import distill
    from minioprd.errors import MinioprdError
    from minioprd.builtin.tiny import build_tokenizer

    teacher = teacher or arch
    _check({"--student": arch, "--teacher": teacher}, objectives)
    if steps < 2:
        raise MinioprdError(f"--steps {steps}: the step bench needs at least 2 (the first is a warm-up)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="minioprd-bench-") as tmp:
        root = Path(tmp)
        tok = build_tokenizer()
        s_dir = _random_model_dir(arch, root / "student", tok, seed=0)
        t_dir = s_dir if teacher == arch else _random_model_dir(teacher, root / "teacher", tok, seed=1)
        words = "the a of to and is in that it for on with as was at by be this are or from".split()
        rng = random.Random(0)
        data = root / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(prompt_len))}) + "\n"
                                for _ in range(batch * steps)))
        for obj, procs in [(o, n) for o in objectives for n in sorted({1, processes})]:
            run_dir = root / f"run-{obj}-{procs}"
            over = {"model.teacher": str(t_dir), "model.student": str(s_dir), "model.teacher_quant": teacher_quant,
                    "model.device": device, "data.dataset": str(data), "data.chat_template": "false",
                    "data.max_prompt_tokens": prompt_len, "data.long_prompts": "truncate",
                    "rollout.prompts_per_step": batch, "rollout.n": 1, "rollout.max_new_tokens": response_len,
                    "loss.objective": obj, "lora.gradient_checkpointing": gradient_checkpointing,
                    "train.steps": steps, "train.threads": threads, "train.output_dir": str(run_dir),
                    "train.collapse_threshold": 0.0, "train.collapse_repetition": 1.0}
            if procs == 1:
                distill(load_config(None, over), console=None)
            else:
                _launch_distill(over, procs, device)
            lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
            row = {"objective": obj, "processes": procs, "steps_measured": len(lines)}
            for key in ("rollout_s", "teacher_s", "update_s", "step_s"):
                row[key] = sum(l[key] for l in lines) / len(lines)
            row["tokens_per_s"] = sum(l["tokens_per_s"] for l in lines) / len(lines)
            row["response_len"] = sum(l["response_len"] for l in lines) / len(lines)
            for key in ("rollout", "teacher", "update"):
                row[f"{key}_share"] = row[f"{key}_s"] / row["step_s"]
            if procs > 1:  # the one-process row of this objective was measured just before
                row["speedup"] = rows[-1]["step_s"] / row["step_s"]
            rows.append(row)
            log(f"{obj}" + (f" ({procs} processes)" if processes > 1 else "") + f": {row['step_s']:.2f} s/step = rollout {row['rollout_s']:.2f} + teacher {row['teacher_s']:.2f}"
                f" + update {row['update_s']:.2f}")
    return {"bench": "step", "arch": arch, "teacher": teacher, "device": device, "batch": batch,
            "prompt_len": prompt_len, "response_len": response_len, "teacher_quant": teacher_quant,
            "gradient_checkpointing": gradient_checkpointing, "threads": threads or os.cpu_count(),
            "processes": processes, "load_average": os.getloadavg()[0], "machine": _machine(device), "rows": rows}


def _launch_distill(over: dict[str, Any], processes: int, device: str) -> None:
    """`minioprd distill` with these overrides in `processes` data-parallel processes (accelerate launch)."""
    import subprocess

    from minioprd.errors import MinioprdError
    from minioprd.parallel import launch_command, launch_env

    args = ["distill", *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in over.items())]
    p = subprocess.run(launch_command(processes, args), env=launch_env(device == "cpu"), capture_output=True,
                       text=True)
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        raise MinioprdError(f"the {processes}-process run failed (exit {p.returncode}): {last}")


def _machine(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# --------------------------------------------------------------------------------------------- the command


def bench_command(what: str, *, student: str, teacher: str, objectives: str | None, batch: int, prompt_len: int,
                  response_len: int | None, steps: int, n: int, settings: str, topk: int, chunk: int, device: str,
                  teacher_quant: str, gradient_checkpointing: bool, micro_batch: int, threads: int,
                  output: Path | None, console: Any, processes: int = 1) -> dict[str, Any]:
    """`minioprd bench update|step|rollout`: run the bench, print its table (and write `output` as JSON)."""
    from minioprd.errors import MinioprdError
    from minioprd.files import atomic_write_json

    say = lambda m: console.print(m, markup=False, highlight=False)  # noqa: E731
    objs = tuple(o.strip() for o in objectives.split(",") if o.strip()) if objectives else None
    if what == "update":
        res = run_update_bench(student, objs or OBJECTIVES, batch, prompt_len, response_len or 512, steps, device,
                               topk, chunk, threads, gradient_checkpointing, micro_batch, log=say)
        console.print(update_table(res, student, batch, response_len or 512, gradient_checkpointing))
    elif what == "step":
        res = run_step_bench(student, teacher, objs or ("oprd", "opd_topk"), batch, prompt_len, response_len or 128,
                             max(steps, 2), device, teacher_quant, gradient_checkpointing, threads, processes, log=say)
        console.print(step_table(res, student, batch, response_len or 128))
    elif what == "rollout":
        names = tuple(k for k in ROLLOUT_SETTINGS if device == "cpu" or k not in CPU_ONLY_SETTINGS) \
            if settings.strip() == "all" else tuple(x.strip() for x in settings.split(",") if x.strip())
        res = run_rollout_bench(student, batch, prompt_len, response_len or 128, device, repeats=steps,
                                threads=threads, n=n, settings=names, log=say)
        console.print(rollout_table(res, student, batch, n))
        say(f"bound: {res['bytes_per_decode_step'] / 1e9:.3f} GB per decode step / {res['bandwidth_gb_s']:.1f} "
            f"GB/s ({res['bandwidth_source']}) = {res['bound_decode_steps_per_s']:.2f} steps/s; fastest: "
            f"{res['fastest']} at {res['fastest_speedup_vs_bare']:.2f}x bare generate")
        for note in res["notes"]:
            say(f"note: {note}")
    else:
        raise MinioprdError(f"unknown bench {what!r}: choose update, rollout or step")
    if output is not None:
        atomic_write_json(output, res)
        say(f"wrote {output}")
    return res


def update_table(res: dict[str, Any], student: str, batch: int, response_len: int, gradient_checkpointing: bool) -> Any:
    """`run_update_bench`'s result as a rich table: time, peak memory and FLOPs per objective, ratios to oprd."""
    from rich.table import Table

    gc = "with" if gradient_checkpointing else "no"
    mb = f" in micro-batches of {res['micro_batch']}" if res["micro_batch"] < batch else ""
    table = Table(title=f"update step, {student} shape, {batch} x {response_len} tokens{mb}, {gc} gradient "
                        f"checkpointing, {res['machine']}")
    # GFLOP (forward + recompute + backward, counted on the warm-up step) shows how much of a time ratio is the
    # work itself: on a compute-bound machine time cannot fall below it.
    for col in ("objective", "s/update", "peak +MB", "GFLOP", "time vs oprd", "memory vs oprd", "work vs oprd"):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        gflop = f"{r['gflop']:,.0f}" if r["gflop"] >= 100 else f"{r['gflop']:.3g}"
        table.add_row(r["objective"], f"{r['seconds']:.2f}", f"{r['peak_increase_mb']:.0f}", gflop,
                      *(f"{r.get(k + '_vs_oprd', float('nan')):.2f}x" for k in ("time", "memory", "work")))
    return table


def step_table(res: dict[str, Any], student: str, batch: int, response_len: int) -> Any:
    """`run_step_bench`'s result as a rich table: seconds per step and the rollout / teacher / update shares."""
    from rich.table import Table

    table = Table(title=f"whole step, teacher {res['teacher']} -> student {student} shape, {batch} x {response_len} "
                        f"tokens, {res['machine']}")
    several = res.get("processes", 1) > 1
    for col in ("objective", *(("processes",) if several else ()), "s/step", "rollout", "teacher", "update",
                "gen tokens/s", *(("speed-up",) if several else ())):
        table.add_column(col, justify="right")
    for r in res["rows"]:
        table.add_row(r["objective"], *((str(r["processes"]),) if several else ()), f"{r['step_s']:.2f}",
                      *(f"{r[k + '_s']:.2f} s ({100 * r[k + '_share']:.0f}%)"
                        for k in ("rollout", "teacher", "update")),
                      f"{r['tokens_per_s']:.1f}", *((f"{r['speedup']:.2f}x" if "speedup" in r else "",) if several else ()))
    return table


def rollout_table(res: dict[str, Any], student: str, batch: int, n: int) -> Any:
    """`run_rollout_bench`'s result as a rich table: each setting's tokens/s against bare generate and the bound."""
    from rich.table import Table

    table = Table(title=f"rollout, {student} shape, {batch} prompts x {n} x {res['new_tokens']} new tokens, "
                        f"{res['dtype']}, {res['machine']}" + (f", {res['threads']} threads" if res["threads"] else ""))
    for col in ("setting", "tokens/s", "decode steps/s", "vs bare", "of bound", "first call s", "same tokens"):
        table.add_column(col, justify="right")
    for r in res["rows_by_setting"]:
        table.add_row(r["setting"], f"{r['tokens_per_s']:.1f}", f"{r['decode_steps_per_s']:.2f}",
                      f"{r['speedup_vs_bare']:.2f}x", f"{100 * r['fraction_of_bound']:.0f}%",
                      f"{r['first_call_s']:.1f}", f"{100 * r['same_tokens_as_bare']:.0f}%")
    return table
