"""The GPU check: validate the product on the first GPU that comes, in one command of at most 8 minutes.

    bash scripts/gpu_check.sh                 # on the GPU machine; writes gpu-check.json + gpu-check.md to $OUT
    bash scripts/gpu_check.sh --dry-run       # anywhere: the plan, and whether the wheelhouse is complete
    python -m minioprd.gpucheck --mode cpu    # every row at toy shapes on the CPU (what the tests run)

GPU machines come rarely, for minutes, bare (no network; Python 3.12 with torch, transformers and peft but no
bitsandbytes or datasets). `scripts/gpu_wheelhouse.sh` downloads the wheels they lack (`WHEELS`) on a machine
with a package registry; `scripts/gpu_check.sh` installs them from that folder and runs this module, which runs
each row (`PHASES`) in its own process with its own time budget, kills it when the budget is spent, and stops
starting rows before the whole budget (`TOTAL_BUDGET_S`) is spent. The report is rewritten after every row, so
whatever stops the run leaves the rows done so far. A row without what it needs (bitsandbytes for NF4, a CUDA
device) is `not_run` with the reason; the NF4 teacher falls back to bf16 then, and says so.

Models are random weights at real shapes (Qwen2.5-0.5B student, Qwen2.5-7B teacher), built from the config
directly on the device: nothing is read from or written to disk for them except in the merge row, which needs a
base checkpoint (the 0.5B student, about 1 GB).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from minioprd.errors import MinioprdError

SCHEMA = 1
STATUSES = ("pass", "fail", "not_run")
# On a GPU the rollout row times the settings a run can get (`plain` = every speed-up off, `static`, and
# `compiled_unmerged` = rollout.cache/compile=auto's choice on CUDA): each compiled setting costs a compile
# (tens of seconds), so the LoRA-merged compiled variant is left to `minioprd bench rollout` by hand.
GPU_ROLLOUT_SETTINGS = "plain,shared,static,compiled_unmerged"
TOTAL_BUDGET_S = 460  # the script's own limit is 480 s (8 min): wheel install and start-up fit in the rest
MIN_PHASE_S = 15  # a row is not started with less time than this left
PLAN_TOLERANCE = 0.25  # |planner estimate / measured peak - 1| above this fails a distill row (CUDA only)
ROLLOUT_OVERHEAD_MAX = 0.15  # minioprd's rollout may be at most this much slower than a bare generate (CUDA only)
# What the GPU image lacks (bitsandbytes) or has at an unknown version (peft; the project needs >= 0.21).
WHEELS = {"bitsandbytes": "0.50.2", "peft": "0.21.2"}
CARRY_LIMIT_MIB = 64  # the device tool carries at most this much beside the working tree
TREE_ALLOWANCE_MIB = 4  # room kept for the working tree itself (about 1 MiB today)
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Phase:
    name: str
    budget_s: int
    what: str
    needs_bnb: bool = False  # the row is about NF4 and cannot run without bitsandbytes


PHASES: tuple[Phase, ...] = (
    Phase("env", 25, "versions, the card, whether bitsandbytes loads its CUDA library"),
    Phase("gpu_tests", 55, "pytest -m gpu (tests/test_gpu.py): fp16 loss scaling, teacher_device, NF4 teacher"),
    Phase("distill_fp16", 95, "distill 3 steps, 0.5B student / 7B teacher (NF4, else bf16), fp16 + loss scaling: "
                              "peak memory vs `minioprd plan`, s/step = rollout + teacher + update"),
    Phase("distill_bf16", 80, "the same in bf16"),
    Phase("bench_update", 50, "`bench update` oprd vs opd_topk: time and memory ratios"),
    Phase("bench_rollout", 100, "`bench rollout`: tokens/s of the rollout settings (off, static, compiled) vs "
                                "bare generate"),
    Phase("merge_qlora", 55, "QLoRA run (NF4 student) on the device, then `merge` and its logit check", True),
)
PHASE_NAMES = tuple(p.name for p in PHASES)


@dataclass(frozen=True)
class Shapes:
    student: str
    teacher: str
    prompts_per_step: int
    n: int
    prompt_len: int
    new_tokens: int  # distill rows' rollout length
    update_batch: int
    update_response_len: int
    rollout_batch: int
    rollout_new_tokens: int


MODES = {
    "gpu": Shapes("qwen2.5-0.5b", "qwen2.5-7b", 4, 2, 64, 128, 4, 512, 8, 64),
    # toy shapes: every row's code path on a CPU in seconds (the tests run this)
    "cpu": Shapes("tiny", "tiny-teacher", 2, 2, 12, 8, 2, 16, 2, 8),
}


@dataclass
class Context:
    mode: str
    device: str
    work: Path
    bnb: bool
    rollout_args: tuple[str, ...] = ()

    @property
    def shapes(self) -> Shapes:
        return MODES[self.mode]

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


class Failed(list):
    """The failures a row found (an empty list: it passed)."""


# --------------------------------------------------------------------------------------------- helpers


def _model_config(arch: str) -> Any:
    """A transformers config at `arch`'s real shape; `tiny-teacher` is a wider, deeper toy (projections)."""
    from transformers import Qwen2Config

    from minioprd.bench import build_config

    if arch == "tiny-teacher":
        return Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return build_config(arch)


def _config_dir(arch: str, root: Path, tok: Any) -> tuple[Path, Any]:
    """config.json + tokenizer, no weights: what `plan`, `resolve_model` and the saved adapter need to see."""
    cfg = _model_config(arch)
    cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
    d = root / arch
    cfg.save_pretrained(d)
    tok.save_pretrained(d)
    return d, cfg


def quantize_nf4_(model: Any, compute_dtype: Any) -> int:
    """Replace the decoder blocks' Linear layers by bitsandbytes NF4 ones (double quantization), in place, as
    `from_pretrained(quantization_config=...)` does for a checkpoint: embeddings, norms and the LM head stay.
    Returns the number of layers replaced. The weights are quantized where they are (on the GPU: no disk)."""
    import bitsandbytes as bnb
    import torch

    n = 0
    for block in model.model.layers:
        for name, mod in list(block.named_modules()):
            if type(mod) is not torch.nn.Linear:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=q).to(mod.weight.device)
            if mod.bias is not None:
                q.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
            setattr(parent, attr, q)
            n += 1
    return n


def random_setup(cfg: Any, student_cfg: Any, teacher_cfg: Any, tok: Any, prompts: list[list[int]],
                 log: Any = print) -> Any:
    """A `distill.Setup` on random weights built from the configs directly on the device (no checkpoint),
    loaded as `distill.prepare` loads real models: LoRA student (`models.attach_lora`), frozen teacher in
    cfg.model.teacher_quant (NF4 through `quantize_nf4_`), width projections, layer map."""
    import torch
    from transformers import AutoModelForCausalLM

    from minioprd.capture import num_layers
    from minioprd.layers import layer_map
    from minioprd.models import attach_lora, pick_device, pick_dtype
    from minioprd.prepare import Setup
    from minioprd.projections import width_projections

    torch.set_num_threads(cfg.train.threads or max(1, os.cpu_count() or 1))
    device = pick_device(cfg.model.device)
    t_device = device if cfg.model.teacher_device == "same" else pick_device(cfg.model.teacher_device)
    dtype = pick_dtype(cfg.model.dtype, device)
    t0 = time.time()
    # as models.load_teacher: the run's dtype on a GPU; on a CPU fp32 weights, NF4 computing in bf16
    t_dtype = pick_dtype(cfg.model.dtype, t_device) if t_device.type == "cuda" else torch.float32
    torch.manual_seed(1)
    with torch.device(t_device):
        teacher = AutoModelForCausalLM.from_config(teacher_cfg, dtype=t_dtype)
    teacher.to(t_device)  # a no-op where the device context was honoured (the weights were made there)
    if cfg.model.teacher_quant == "4bit":
        quantize_nf4_(teacher, t_dtype if t_device.type == "cuda" else torch.bfloat16)
    elif cfg.model.teacher_quant != "none":
        raise MinioprdError(f"random_setup: teacher_quant {cfg.model.teacher_quant!r} is not built here")
    teacher.eval()
    teacher.requires_grad_(False)
    if t_device.type == "cuda":
        torch.cuda.empty_cache()  # the unquantized copy's blocks must not stay reserved (they'd count as peak)
    log(f"teacher: random {teacher_cfg.num_hidden_layers}x{teacher_cfg.hidden_size} ({cfg.model.teacher_quant}) "
        f"built on {t_device} in {time.time() - t0:.1f}s")
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(student_cfg, dtype=dtype)
    student = attach_lora(base.to(device), cfg.lora, quantized=False, seed=cfg.train.seed)
    pairs = layer_map(cfg.loss.layers, num_layers(student), num_layers(teacher), cfg.loss.teacher_layers)
    d_s, d_t = student_cfg.hidden_size, teacher_cfg.hidden_size
    torch.manual_seed(cfg.train.seed)
    projections = width_projections(len(pairs), d_s, d_t, device) if d_s != d_t else torch.nn.ModuleList()
    return Setup(cfg, device, t_device, dtype, student, teacher, tok, prompts, pairs, projections)


def _random_prompts(tok: Any, count: int, length: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    first = len(tok.all_special_ids)  # tiny.build_tokenizer puts its special tokens first
    return [[rng.randrange(first, len(tok)) for _ in range(length)] for _ in range(count)]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# --------------------------------------------------------------------------------------------- rows


def phase_env(ctx: Context) -> tuple[dict[str, Any], Failed]:
    import importlib.metadata as md

    import torch

    fails = Failed()
    figs: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    for pkg in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "typer", "rich"):
        try:
            figs[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            figs[pkg] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figs.update(gpu=props.name, gpu_mib=props.total_memory // 2**20, capability=f"{props.major}.{props.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported())
    elif ctx.cuda:
        fails.append("no CUDA device visible to torch")
    if ctx.bnb:
        try:
            import bitsandbytes as bnb
            from bitsandbytes.cextension import lib

            figs["bitsandbytes_lib"] = str(getattr(lib, "_name", type(lib).__name__))
            if ctx.cuda:  # one NF4 round trip through the CUDA kernels
                w = torch.randn(256, 256, device=ctx.device, dtype=torch.bfloat16)
                q, state = bnb.functional.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
                back = bnb.functional.dequantize_4bit(q, state)
                figs["nf4_roundtrip_rel_err"] = float((back - w).norm() / w.norm())
                if not figs["nf4_roundtrip_rel_err"] < 0.15:
                    fails.append(f"NF4 round trip error {figs['nf4_roundtrip_rel_err']:.3f} (expected ~0.1)")
        except Exception as e:  # noqa: BLE001 - any failure means the NF4 rows cannot be trusted
            fails.append(f"bitsandbytes does not work here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    import minioprd

    figs["minioprd"] = minioprd.__version__
    figs["summary"] = (f"{figs.get('gpu', 'no GPU')}, torch {figs['torch']}, transformers {figs['transformers']}, "
                       f"peft {figs['peft']}, bitsandbytes {figs['bitsandbytes']}")
    return figs, fails


def phase_gpu_tests(ctx: Context) -> tuple[dict[str, Any], Failed]:
    tests = REPO / "tests" / "test_gpu.py"
    if not tests.is_file():
        raise NotRun(f"{tests} is missing (run from a checkout)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if not ctx.cuda:
        env["MINIOPRD_TEST_DEVICE"] = "cpu"  # the GPU tests' logic on the CPU (cpu mode)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(tests)],
                       capture_output=True, text=True, cwd=REPO, env=env)
    text = p.stdout + p.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", text)}
    figs = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
            "skipped": counts.get("skipped", 0), "errors": counts.get("error", 0) + counts.get("errors", 0),
            "exit_code": p.returncode}
    fails = Failed()
    if p.returncode != 0 or figs["passed"] == 0:
        tail = [l for l in text.strip().splitlines() if l.strip()][-6:]
        fails.append(f"pytest exit {p.returncode}: " + " | ".join(tail))
    print(text[-4000:])
    figs["summary"] = f"{figs['passed']} passed, {figs['failed']} failed, {figs['skipped']} skipped"
    return figs, fails


def _distill_row(ctx: Context, dtype: str) -> tuple[dict[str, Any], Failed]:
    import torch

    from minioprd.builtin.tiny import build_tokenizer
    from minioprd.config import load_config
    from minioprd.files import read_jsonl
    from minioprd.measure import measure

    sh, steps = ctx.shapes, 3
    root = ctx.work / f"distill-{dtype}"
    shutil.rmtree(root, ignore_errors=True)
    tok = build_tokenizer()
    s_dir, s_cfg = _config_dir(sh.student, root, tok)
    t_dir, t_cfg = _config_dir(sh.teacher, root, tok)
    quant = "4bit" if ctx.bnb else "none"
    cfg = load_config(None, {
        "model.teacher": str(t_dir), "model.student": str(s_dir), "model.teacher_quant": quant,
        "model.device": ctx.device, "model.dtype": dtype, "data.dataset": "builtin:chat", "loss.objective": "oprd",
        "data.max_prompt_tokens": sh.prompt_len, "rollout.prompts_per_step": sh.prompts_per_step,
        "rollout.n": sh.n, "rollout.max_new_tokens": sh.new_tokens, "lora.gradient_checkpointing": "true",
        "train.steps": steps, "train.fp16_loss_scale": "true", "train.collapse_threshold": 0.0,
        "train.collapse_repetition": 1.0, "train.threads": 0 if ctx.cuda else 1})
    prompts = _random_prompts(tok, sh.prompts_per_step * (steps + 1), sh.prompt_len)
    built: dict[str, float] = {}

    def prepare(c: Any, log: Any = print) -> Any:
        # distill has already run train.fit=auto on `c` (CUDA): the settings measured and planned are its picks
        built["fit"] = {"note": getattr(c, "fit_note", None), "rollout.micro_batch": c.rollout.micro_batch,
                        "lora.gradient_checkpointing": c.lora.gradient_checkpointing,
                        "loss.opd_chunk": c.loss.opd_chunk}
        t0 = time.time()
        s = random_setup(c, s_cfg, t_cfg, tok, prompts, log=print)
        built["build_s"] = time.time() - t0
        return s

    run_dir = root / "run"
    m = measure(cfg, steps=steps, output_dir=str(run_dir), prepare=prepare)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("step", 0) >= 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    later = rows[1:] or rows  # step 1 carries one-off costs (kernels, allocator growth)
    figs: dict[str, Any] = {
        "student": sh.student, "teacher": sh.teacher, "teacher_quant": quant, "dtype": dtype,
        "batch": sh.prompts_per_step * sh.n, "prompt_tokens": sh.prompt_len, "new_tokens": sh.new_tokens,
        "steps": len(rows), "build_s": built.get("build_s"), "fit": built.get("fit"),
        "peak_measured_mib": m["measured_mib"], "plan_estimate_mib": m["estimated_mib"],
        "plan_error_pct": 100 * m["error"], "memory_how": m["how"],
        "step1_s": rows[0]["step_s"] if rows else None,
        "s_per_step": _mean([r["step_s"] for r in later]),
        "rollout_s": _mean([r["rollout_s"] for r in later]), "teacher_s": _mean([r["teacher_s"] for r in later]),
        "update_s": _mean([r["update_s"] for r in later]),
        "gen_tokens_per_s": _mean([r["tokens_per_s"] for r in later]),
        "loss_first": rows[0]["loss"] if rows else None, "loss_last": rows[-1]["loss"] if rows else None,
        "loss_scale": [r.get("loss_scale") for r in rows], "fp16_overflow_steps": summary["fp16_overflow_steps"],
        "nonfinite_steps": summary["nonfinite_steps"],
    }
    if ctx.cuda:
        figs["gpu"] = torch.cuda.get_device_name()
    fails = Failed()
    if len(rows) != steps:
        fails.append(f"{len(rows)} of {steps} steps logged")
    if not all(_finite(r["loss"]) for r in rows) or summary["nonfinite_steps"]:
        fails.append(f"non-finite loss or gradient ({summary['nonfinite_steps']} steps skipped)")
    if dtype == "fp16":
        if not all(_finite(x) and x > 1 for x in figs["loss_scale"]):
            fails.append(f"fp16 without loss scaling in the metrics: loss_scale {figs['loss_scale']}")
        if summary["fp16_overflow_steps"] >= steps:
            fails.append("every fp16 step overflowed: no update was applied")
    if ctx.cuda and not abs(m["error"]) <= PLAN_TOLERANCE:
        fails.append(f"planner off by {100 * m['error']:+.0f}% (estimate {m['estimated_mib']:.0f} MiB, measured "
                     f"{m['measured_mib']:.0f} MiB; tolerance {100 * PLAN_TOLERANCE:.0f}%)")
    figs["summary"] = (f"{quant} teacher, {dtype}: {figs['s_per_step'] or float('nan'):.2f} s/step (rollout "
                       f"{figs['rollout_s'] or float('nan'):.2f} + teacher {figs['teacher_s'] or float('nan'):.2f} + "
                       f"update {figs['update_s'] or float('nan'):.2f}); peak {m['measured_mib']:.0f} MiB vs plan "
                       f"{m['estimated_mib']:.0f} MiB ({100 * m['error']:+.1f}%)")
    return figs, fails


def phase_distill_fp16(ctx: Context) -> tuple[dict[str, Any], Failed]:
    return _distill_row(ctx, "fp16")


def phase_distill_bf16(ctx: Context) -> tuple[dict[str, Any], Failed]:
    return _distill_row(ctx, "bf16")


def phase_bench_update(ctx: Context) -> tuple[dict[str, Any], Failed]:
    from minioprd.bench import run_update_bench

    sh = ctx.shapes
    arch = sh.student
    res = run_update_bench(arch, ("oprd", "opd_topk"), batch=sh.update_batch, prompt_len=sh.prompt_len,
                           response_len=sh.update_response_len, steps=2, device=ctx.device,
                           threads=0 if ctx.cuda else 1)
    by = {r["objective"]: r for r in res["rows"]}
    o, t = by["oprd"], by["opd_topk"]
    figs = {"student": arch, "batch": sh.update_batch, "response_len": sh.update_response_len,
            "oprd_s": o["seconds"], "opd_topk_s": t["seconds"], "oprd_peak_mb": o["peak_increase_mb"],
            "opd_topk_peak_mb": t["peak_increase_mb"], "time_ratio": t["time_vs_oprd"],
            "memory_ratio": t["memory_vs_oprd"], "work_ratio": t["work_vs_oprd"], "machine": res["machine"]}
    fails = Failed()
    if not all(_finite(figs[k]) for k in ("time_ratio", "memory_ratio", "work_ratio")):
        fails.append("a ratio is not finite")
    if ctx.cuda and not figs["memory_ratio"] > 1:
        fails.append(f"opd_topk peaks at {figs['memory_ratio']:.2f}x oprd's memory: OPRD should need less")
    figs["summary"] = (f"opd_topk vs oprd: time {figs['time_ratio']:.2f}x, memory {figs['memory_ratio']:.2f}x, "
                       f"work {figs['work_ratio']:.2f}x ({o['seconds']:.2f} s / +{o['peak_increase_mb']:.0f} MB oprd)")
    return figs, fails


def phase_bench_rollout(ctx: Context) -> tuple[dict[str, Any], Failed]:
    """Whatever `minioprd bench rollout` measures (its JSON's `tokens_per_s`: every setting it offers, on a GPU
    the compiled ones too; the CPU mode leaves out compiling, minutes there), each against the bare `generate`,
    with the fraction of the bandwidth bound each reaches; `--rollout-args` passes extra flags to it."""
    sh = ctx.shapes
    out = ctx.work / "bench-rollout.json"
    out.unlink(missing_ok=True)
    args = ["bench", "rollout", "--student", sh.student, "--device", ctx.device, "--batch", str(sh.rollout_batch),
            "--prompt-len", str(sh.prompt_len), "--response-len", str(sh.rollout_new_tokens), "--threads",
            "0" if ctx.cuda else "1", "--settings", GPU_ROLLOUT_SETTINGS if ctx.cuda else "plain,shared,packed,static",
            *ctx.rollout_args]
    p = subprocess.run([sys.executable, "-m", "minioprd.cli", *args, "-o", str(out)], capture_output=True,
                       text=True, cwd=REPO)
    print(p.stdout[-4000:], p.stderr[-4000:])
    shown = "minioprd " + " ".join(args)
    if p.returncode != 0 or not out.is_file():
        tail = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        return {"command": shown}, Failed([f"bench rollout exit {p.returncode}: {tail}"])
    res = json.loads(out.read_text())
    tps = {k: float(v) for k, v in (res.get("tokens_per_s") or {}).items()}
    figs: dict[str, Any] = {"command": shown, "machine": res.get("machine")}
    fails = Failed()
    bare = tps.get("bare_generate")
    if not bare:
        return figs, Failed(["bench rollout reported no bare_generate tokens/s"])
    for name, v in tps.items():
        figs[f"tokens_per_s/{name}"] = v
        figs[f"vs_bare/{name}"] = v / bare
    for row in res.get("rows_by_setting") or []:
        figs[f"fraction_of_bound/{row['setting']}"] = row.get("fraction_of_bound")
        figs[f"same_tokens/{row['setting']}"] = row.get("same_tokens_as_bare")
    for k, v in res.items():  # settings and ratios the bench adds (kept as they come)
        if k not in ("tokens_per_s", "machine") and isinstance(v, (int, float, str, bool)):
            figs.setdefault(k, v)
    ours = tps.get("plain")  # minioprd's rollout with every speed-up off: its own overhead over generate
    if ours is None:
        fails.append("bench rollout reported no plain (every speed-up off) tokens/s")
    elif ctx.cuda and ours / bare < 1 - ROLLOUT_OVERHEAD_MAX:
        fails.append(f"minioprd's rollout runs at {ours / bare:.2f}x a bare generate (allowed down to "
                     f"{1 - ROLLOUT_OVERHEAD_MAX:.2f}x)")
    figs["summary"] = f"bare generate {bare:.0f} tok/s; " + ", ".join(
        f"{n} {v / bare:.2f}x" for n, v in tps.items() if n != "bare_generate")
    return figs, fails


def phase_merge_qlora(ctx: Context) -> tuple[dict[str, Any], Failed]:
    import torch
    from transformers import AutoModelForCausalLM

    from minioprd.builtin.tiny import build_tokenizer
    from minioprd.config import load_config
    from minioprd.distill import distill
    from minioprd.merge import _dense, load_base, merge_adapter
    from minioprd.models import quantization_config

    sh = ctx.shapes
    root = ctx.work / "merge"
    shutil.rmtree(root, ignore_errors=True)
    tok = build_tokenizer()
    base_dir, s_cfg = _config_dir(sh.student, root, tok)
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device(ctx.device):  # random weights built on the device, saved once as the QLoRA base
        AutoModelForCausalLM.from_config(s_cfg, dtype=torch.bfloat16).save_pretrained(base_dir)
    figs: dict[str, Any] = {"student": sh.student, "base_write_s": time.time() - t0}
    cfg = load_config(None, {
        "model.teacher": str(base_dir), "model.student": str(base_dir), "model.teacher_quant": "none",
        "model.student_quant": "4bit", "model.device": ctx.device, "data.dataset": "builtin:chat",
        "data.max_prompt_tokens": sh.prompt_len, "data.long_prompts": "truncate", "data.chat_template": "false",
        "rollout.prompts_per_step": 2, "rollout.n": 1, "rollout.max_new_tokens": sh.rollout_new_tokens,
        "train.steps": 2, "train.lr": 1e-2, "train.output_dir": str(root / "run"), "train.collapse_threshold": 0.0,
        "train.collapse_repetition": 1.0, "train.threads": 0 if ctx.cuda else 1})
    t0 = time.time()
    summary = distill(cfg, console=None)
    figs["qlora_run_s"] = time.time() - t0
    figs["qlora_nonfinite_steps"] = summary["nonfinite_steps"]
    t0 = time.time()
    rep = merge_adapter(root / "run", root / "merged", dtype="bf16", log=print)
    figs.update(merge_s=time.time() - t0, verified=rep.get("verified"), dequantized=rep.get("dequantized"),
                max_abs_diff=rep.get("max_abs_diff"), tolerance=rep.get("tolerance"),
                adapter_effect=rep.get("adapter_effect"), merged_bytes=rep.get("size_bytes"),
                peak_rss_mb=rep.get("peak_rss_mb"))
    # merge dequantizes an NF4 base it quantizes on the CPU; training quantized it on the device. Both must give
    # the same weights, or the merged model is not the one that was trained.
    cpu = load_base(str(base_dir), "bf16", four_bit=True)
    dev = AutoModelForCausalLM.from_pretrained(str(base_dir), device_map={"": ctx.device},
                                               quantization_config=quantization_config("4bit", torch.bfloat16))
    a = _dense(cpu.model.layers[0].self_attn.q_proj.weight).float().cpu()
    b = _dense(dev.model.layers[0].self_attn.q_proj.weight).float().cpu()
    figs["nf4_device_vs_cpu_max_diff"] = float((a - b).abs().max())
    figs["nf4_device_vs_cpu_rel_err"] = float((a - b).norm() / a.norm().clamp(min=1e-30))
    figs["nf4_device_vs_cpu_mismatch_frac"] = float((a != b).float().mean())
    fails = Failed()
    if summary["nonfinite_steps"]:
        fails.append(f"the QLoRA run skipped {summary['nonfinite_steps']} non-finite steps")
    if not rep.get("verified"):
        fails.append(f"merge not verified: max |logit diff| {rep.get('max_abs_diff')} vs tolerance "
                     f"{rep.get('tolerance')}")
    # a few values on a rounding boundary may land on the neighbouring code; a systematic difference may not
    if figs["nf4_device_vs_cpu_rel_err"] > 1e-3:
        fails.append(f"NF4 weights quantized on {ctx.device} and on the CPU differ (relative error "
                     f"{figs['nf4_device_vs_cpu_rel_err']:.3g}, {100 * figs['nf4_device_vs_cpu_mismatch_frac']:.2f}% "
                     f"of values): merge exports other weights than were trained")
    figs["summary"] = (f"QLoRA {figs['qlora_run_s']:.1f}s, merge {figs['merge_s']:.1f}s, logit diff "
                       f"{rep.get('max_abs_diff') or float('nan'):.3g} (tolerance {rep.get('tolerance') or float('nan'):.3g},"
                       f" adapter effect {rep.get('adapter_effect') or float('nan'):.3g}); NF4 {ctx.device} vs CPU "
                       f"relative error {figs['nf4_device_vs_cpu_rel_err']:.3g}")
    return figs, fails


class NotRun(Exception):
    """Raised by a row that cannot run here; the message says why."""


PHASE_FUNCS: dict[str, Callable[[Context], tuple[dict[str, Any], Failed]]] = {
    "env": phase_env, "gpu_tests": phase_gpu_tests, "distill_fp16": phase_distill_fp16,
    "distill_bf16": phase_distill_bf16, "bench_update": phase_bench_update, "bench_rollout": phase_bench_rollout,
    "merge_qlora": phase_merge_qlora,
}


# --------------------------------------------------------------------------------------------- running


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def run_phase_here(name: str, ctx: Context) -> dict[str, Any]:
    """One row in this process: {"figures", "failures"} or {"not_run": why}; exceptions become a failure."""
    try:
        figs, fails = PHASE_FUNCS[name](ctx)
    except NotRun as e:
        return {"not_run": str(e)}
    except Exception as e:  # noqa: BLE001 - a row's crash is its result, the next rows still run
        import traceback

        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"figures": {}, "failures": [f"{type(e).__name__}: {first[:300]}"]}
    return {"figures": _jsonable(figs), "failures": list(fails)}


def _run_isolated(name: str, ctx: Context, budget: float, log_file: Any) -> tuple[dict[str, Any], bool]:
    """The row in a child process (its own session, killed with its children when the budget is spent)."""
    result = ctx.work / f"phase-{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "minioprd.gpucheck", "--phase", name, "--mode", ctx.mode, "--device", ctx.device,
           "--work", str(ctx.work), *(["--no-bnb"] if not ctx.bnb else []),
           *(["--rollout-args", " ".join(ctx.rollout_args)] if ctx.rollout_args else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)}
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                            start_new_session=True)
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return {"figures": {}, "failures": [f"timed out: stopped after its budget of {budget:.0f}s"]}, True
    if result.is_file():
        return json.loads(result.read_text()), False
    return {"figures": {}, "failures": [f"the row's process exited with code {proc.returncode} and no result "
                                        f"(see gpu-check.log)"]}, False


def run_check(out: Path, mode: str = "gpu", phases: tuple[str, ...] = PHASE_NAMES, isolate: bool = True,
              total_budget: float = TOTAL_BUDGET_S, budgets: dict[str, float] | None = None,
              device: str | None = None, bnb: bool | None = None, rollout_args: tuple[str, ...] = (),
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the rows in order, each within its budget, and stop starting rows before `total_budget` is spent.

    The report (gpu-check.json, gpu-check.md in `out`) is rewritten after every row. `isolate=False` runs rows
    in this process (no budget enforcement; the tests use it to keep CPU time down).
    """
    import importlib.util

    from minioprd.files import atomic_write_json, atomic_write_text

    if mode not in MODES:
        raise MinioprdError(f"unknown --mode {mode!r}: choose gpu or cpu")
    unknown = [p for p in phases if p not in PHASE_FUNCS]
    if unknown:
        raise MinioprdError(f"unknown row(s) {', '.join(unknown)}: choose from {', '.join(PHASE_NAMES)}")
    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # models and runs go beside the report, never into it: $OUT comes back from the GPU machine whole
    work = Path(os.environ.get("MINIOPRD_GPU_CHECK_WORK", "") or f"{out}-work")
    work.mkdir(parents=True, exist_ok=True)
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None if bnb is None else bnb
    ctx = Context(mode, device or ("cuda" if mode == "gpu" else "cpu"), work, has_bnb, tuple(rollout_args))
    budgets = {p.name: float(p.budget_s) for p in PHASES} | (budgets or {})
    doc: dict[str, Any] = {
        "schema": SCHEMA, "tool": "minioprd gpu check", "mode": mode, "device": ctx.device,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)), "budget_s": total_budget,
        "bitsandbytes": has_bnb, "seconds": 0.0, "environment": {}, "rows": [], "summary": {},
    }
    log_path = out / "gpu-check.log"
    cuda_missing = False
    with open(log_path, "a") as log_file:
        for phase in (p for p in PHASES if p.name in phases):
            left = total_budget - (time.time() - t_start)
            budget = min(budgets[phase.name], left - 2)
            row: dict[str, Any] = {"name": phase.name, "what": phase.what, "budget_s": round(budget, 1),
                                   "status": "not_run", "seconds": None, "figures": {}, "reason": ""}
            if cuda_missing:
                row["reason"] = "no CUDA device (see the env row)"
            elif phase.needs_bnb and not ctx.bnb:
                row["reason"] = ("bitsandbytes does not load its CUDA library here (env row)" if has_bnb else
                                 "bitsandbytes is not installed: the NF4 wheel did not come "
                                 "(scripts/gpu_wheelhouse.sh, carry .whl)")
            elif budget < MIN_PHASE_S and budgets[phase.name] >= MIN_PHASE_S:
                row["reason"] = f"out of time: {max(left, 0):.0f}s of the {total_budget:.0f}s budget left"
            else:
                log(f"[{time.time() - t_start:5.0f}s] {phase.name} (budget {budget:.0f}s): {phase.what}")
                log_file.write(f"\n===== {phase.name} =====\n")
                log_file.flush()
                t0 = time.time()
                if isolate:
                    res, _ = _run_isolated(phase.name, ctx, budget, log_file)
                else:
                    res = run_phase_here(phase.name, ctx)
                row["seconds"] = round(time.time() - t0, 2)
                if "not_run" in res:
                    row["reason"] = res["not_run"]
                else:
                    row["figures"] = res.get("figures", {})
                    row["status"] = "fail" if res.get("failures") else "pass"
                    row["reason"] = "; ".join(res.get("failures", []))
                if phase.name == "env":
                    doc["environment"] = row["figures"]
                    cuda_missing = ctx.cuda and not row["figures"].get("cuda_available", False)
                    if "bitsandbytes does not work" in row["reason"]:
                        ctx.bnb = False  # the other rows run without NF4 (bf16 teacher) rather than fail on it
                        doc["bitsandbytes"] = False
                log(f"        {row['status']}: {row['figures'].get('summary', '')} {row['reason']}".rstrip())
            if row["status"] == "not_run":
                log(f"        not run: {row['reason']}")
            doc["rows"].append(row)
            doc["seconds"] = round(time.time() - t_start, 2)
            doc["summary"] = {s: sum(r["status"] == s for r in doc["rows"]) for s in STATUSES}
            atomic_write_json(out / "gpu-check.json", doc)
            atomic_write_text(out / "gpu-check.md", markdown(doc))
    problems = validate(doc)
    if problems:  # the report must always be readable by what reads it; say so loudly if not
        raise MinioprdError("gpu check report breaks its schema: " + "; ".join(problems))
    return doc


def validate(doc: Any) -> list[str]:
    """Problems with a gpu-check.json document (empty: it follows schema 1)."""
    p: list[str] = []
    if not isinstance(doc, dict):
        return ["the report is not a JSON object"]
    need = {"schema": int, "tool": str, "mode": str, "device": str, "started_utc": str, "budget_s": (int, float),
            "bitsandbytes": bool, "seconds": (int, float), "environment": dict, "rows": list, "summary": dict}
    for k, t in need.items():
        if not isinstance(doc.get(k), t) or isinstance(doc.get(k), bool) and t in (int, (int, float)):
            p.append(f"{k}: missing or not {t}")
    if doc.get("schema") != SCHEMA:
        p.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA}")
    if doc.get("mode") not in MODES:
        p.append(f"mode {doc.get('mode')!r} is not one of {', '.join(MODES)}")
    rows = doc.get("rows") if isinstance(doc.get("rows"), list) else []
    names = [r.get("name") for r in rows if isinstance(r, dict)]
    if len(set(names)) != len(names):
        p.append("a row name repeats")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            p.append(f"rows[{i}] is not an object")
            continue
        where = f"rows[{i}] ({r.get('name')})"
        if r.get("name") not in PHASE_NAMES:
            p.append(f"{where}: unknown name")
        if r.get("status") not in STATUSES:
            p.append(f"{where}: status {r.get('status')!r} not in {STATUSES}")
        for k, t in (("what", str), ("reason", str), ("figures", dict), ("budget_s", (int, float))):
            if not isinstance(r.get(k), t):
                p.append(f"{where}: {k} missing or not {t}")
        if r.get("status") in ("fail", "not_run") and not r.get("reason"):
            p.append(f"{where}: a {r.get('status')} row must say why")
        if r.get("status") == "pass" and r.get("reason"):
            p.append(f"{where}: a passing row has a failure reason")
        if r.get("status") != "not_run" and not isinstance(r.get("seconds"), (int, float)):
            p.append(f"{where}: a row that ran needs its seconds")
        for k, v in (r.get("figures") or {}).items():
            if not (v is None or isinstance(v, (str, int, float, bool, list, dict))):
                p.append(f"{where}: figure {k} is not JSON")
    if isinstance(doc.get("summary"), dict) and rows:
        counts = {s: sum(isinstance(r, dict) and r.get("status") == s for r in rows) for s in STATUSES}
        if doc["summary"] != counts:
            p.append(f"summary {doc['summary']} does not count the rows {counts}")
    return p


def markdown(doc: dict[str, Any]) -> str:
    env = doc.get("environment") or {}
    head = (f"# minioprd GPU check ({doc['mode']} mode, {doc['device']})\n\n"
            f"{env.get('summary', 'environment unknown')}; started {doc['started_utc']}, {doc['seconds']:.0f}s of "
            f"{doc['budget_s']:.0f}s; bitsandbytes {'present' if doc['bitsandbytes'] else 'absent (NF4 rows not run)'}"
            f". {doc['summary'].get('pass', 0)} pass, {doc['summary'].get('fail', 0)} fail, "
            f"{doc['summary'].get('not_run', 0)} not run.\n\n"
            "| row | status | s (budget) | figures | why not pass |\n|---|---|---|---|---|\n")
    lines = []
    for r in doc["rows"]:
        secs = "–" if r["seconds"] is None else f"{r['seconds']:.0f}"
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| {r['name']} | **{r['status']}** | {secs} ({r['budget_s']:.0f}) | "
                     f"{cell(r['figures'].get('summary', ''))} | {cell(r['reason'])} |")
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- dry run


def wheelhouse_status(wheelhouse: Path) -> dict[str, Any]:
    """What of WHEELS the folder holds, extra wheels in it, and its size against the carry limit."""
    files = sorted(wheelhouse.glob("*.whl")) if wheelhouse.is_dir() else []
    found, missing, wrong = {}, [], []
    for name, version in WHEELS.items():
        hits = [f for f in files if f.name.lower().startswith(f"{name.lower()}-")]
        exact = [f for f in hits if f.name.split("-")[1] == version]
        if exact:
            tags = exact[0].name[:-4].split("-")[-3:]
            if not (tags[0] in ("py3", "cp312") and (tags[2] == "any" or "x86_64" in tags[2])):
                wrong.append(f"{exact[0].name} (not for cp312 / x86_64)")
            found[name] = exact[0].name
        else:
            missing.append(f"{name}=={version}" + (f" (has {', '.join(h.name for h in hits)})" if hits else ""))
    extra = [f.name for f in files if f.name not in found.values()]
    size = sum(f.stat().st_size for f in files)
    return {"dir": str(wheelhouse), "found": found, "missing": missing, "wrong": wrong, "extra": extra,
            "bytes": size, "limit_bytes": (CARRY_LIMIT_MIB - TREE_ALLOWANCE_MIB) * 2**20}


RUN_INVOCATION = ('run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540) — after '
                  "`bash scripts/gpu_wheelhouse.sh` here; the report comes back as gpu-check.json, gpu-check.md "
                  "and gpu-check.log in $OUT")


def dry_run(wheelhouse: Path, mode: str = "gpu", phases: tuple[str, ...] = PHASE_NAMES,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Print the plan; raise MinioprdError (one line) when the wheelhouse is incomplete or too large."""
    sh = MODES[mode]
    chosen = [p for p in PHASES if p.name in phases]
    total = sum(p.budget_s for p in chosen)
    log(f"gpu check plan ({mode} mode): student {sh.student}, teacher {sh.teacher}, {sh.prompts_per_step}x"
        f"{sh.n} rollouts of {sh.new_tokens} tokens after {sh.prompt_len}-token prompts")
    for p in chosen:
        log(f"  {p.name:<14} {p.budget_s:>4}s  {p.what}")
    log(f"  row budgets {total}s; the check stops starting rows at {TOTAL_BUDGET_S}s, the script at 480s")
    ws = wheelhouse_status(wheelhouse)
    log(f"wheelhouse {ws['dir']}: {', '.join(ws['found'].values()) or 'no wheels'}; "
        f"{ws['bytes'] / 2**20:.1f} MiB of {ws['limit_bytes'] / 2**20:.0f} MiB")
    if ws["extra"]:
        log(f"  also in it (carried, not needed): {', '.join(ws['extra'])}")
    log(f"next session with a GPU: {RUN_INVOCATION}")
    if ws["missing"] or ws["wrong"]:
        raise MinioprdError(f"wheelhouse {ws['dir']} is incomplete: missing {', '.join(ws['missing']) or 'nothing'}"
                            + (f"; wrong platform: {', '.join(ws['wrong'])}" if ws["wrong"] else "")
                            + ": run `bash scripts/gpu_wheelhouse.sh` (without bitsandbytes the NF4 rows do not run)")
    if ws["bytes"] > ws["limit_bytes"]:
        raise MinioprdError(f"wheelhouse {ws['dir']} holds {ws['bytes'] / 2**20:.1f} MiB, over the "
                            f"{ws['limit_bytes'] / 2**20:.0f} MiB the device tool carries beside the tree: remove "
                            f"{', '.join(ws['extra']) or 'wheels'} or rerun scripts/gpu_wheelhouse.sh")
    return {"phases": [p.name for p in chosen], "row_budget_s": total, "wheelhouse": ws}


# --------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m minioprd.gpucheck", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="report folder ($OUT)")
    ap.add_argument("--mode", default="gpu", help="gpu (real shapes, CUDA) or cpu (toy shapes, CPU)")
    ap.add_argument("--device", default=None, help="default: cuda in gpu mode, cpu in cpu mode")
    ap.add_argument("--rows", default=",".join(PHASE_NAMES), help="comma-separated rows to run")
    ap.add_argument("--wheelhouse", default=".whl", help="folder of the wheels scripts/gpu_wheelhouse.sh fetched")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, check the wheelhouse, run nothing")
    ap.add_argument("--rollout-args", default="", help="extra flags for `minioprd bench rollout`")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole check")
    ap.add_argument("--phase", help=argparse.SUPPRESS)  # child process: run one row, write its result
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--no-bnb", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    rows = tuple(r.strip() for r in a.rows.split(",") if r.strip())
    try:
        if a.phase:
            import importlib.util
            import logging

            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
            bnb = not a.no_bnb and importlib.util.find_spec("bitsandbytes") is not None
            ctx = Context(a.mode, a.device, Path(a.work), bnb, tuple(a.rollout_args.split()))
            res = run_phase_here(a.phase, ctx)
            from minioprd.files import atomic_write_json

            atomic_write_json(Path(a.work) / f"phase-{a.phase}.json", res)
            return 0
        if a.mode not in MODES:
            raise MinioprdError(f"unknown --mode {a.mode!r}: choose gpu or cpu")
        bad = [r for r in rows if r not in PHASE_NAMES]
        if bad:
            raise MinioprdError(f"unknown row(s) {', '.join(bad)} in --rows: choose from {', '.join(PHASE_NAMES)}")
        if a.dry_run:
            dry_run(Path(a.wheelhouse), a.mode, rows)
            return 0
        doc = run_check(Path(a.out), a.mode, rows, device=a.device, total_budget=a.budget,
                        rollout_args=tuple(a.rollout_args.split()))
    except MinioprdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(doc))
    print(f"wrote {Path(a.out) / 'gpu-check.json'} and gpu-check.md")
    return 1 if doc["summary"].get("fail") else 0


if __name__ == "__main__":
    sys.exit(main())
