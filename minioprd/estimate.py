"""The term-by-term memory estimate of a `distill` run, from model configs alone (`minioprd plan` is plan.py).

The estimate follows what `distill.py` actually allocates, per card:

    peak = static + max(rollout, update, optimizer step) + allocator slack + CUDA context
    static   teacher weights (NF4: 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks = 4.127 bit/param on
             the blocks' linear layers; embeddings, lm_head and norms stay in the checkpoint dtype),
             student weights, LoRA params and AdamW moments (fp32), projections Linear(d_S->d_T) + AdamW
    rollout  KV cache  L_S x 2 x kv_heads x head_dim x B x (P + R) x bytes, plus prefill / sampling temporaries
             (a static KV cache, rollout.cache=static or auto on a GPU, is static: kept between steps)
    update   per micro-batch: fp32 grads; teacher targets kept (mapped layers x mb x (P+R) x d_T: the capture
             hooks keep a view of each layer output, so the whole (mb, P+R, d_T) storage stays alive); the
             teacher's one-layer forward temporaries; the student's saved activations up to its deepest
             mapped layer (all of them, or one layer input each with gradient checkpointing, plus one layer
             recomputed in backward); the loss and projection activations; one block's gradients in backward
    step     AdamW's foreach temporaries (CUDA only)

B = prompts_per_step x n, P = data.max_prompt_tokens (the longest prompt: rows are padded to it), R =
max_new_tokens (every response at full length), mb = micro_batch or B. The numbers are upper bounds for that
worst case. Model shapes come from embedded configs (offline), a local directory's config.json, or the
Hugging Face cache. loss.objective=auto is planned for the objective it is expected to pick
(`objective_for_plan`); with a card and train.fit=auto, for the settings `fit.py` picks there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from minioprd.catalog import GPU, GPUS, ModelShape
from minioprd.config import CACHE_BUCKET, Config
from minioprd.errors import MinioprdError

GIB = 1024**3
MIB = 1024**2

# NF4 with double quantization (models.quantization_config): 4-bit codes, one 8-bit absmax per 64 weights,
# one fp32 absmax per 256 of those blocks (bitsandbytes blocksize 64, nested blocksize 256; measured on
# bitsandbytes 0.50.2: 4.129 bit/param on a 4096x1024 layer including the 256-entry code tables).
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
INT8_BITS = 8  # LLM.int8: int8 codes + one fp32 scale per output row (added separately)
CUDA_CONTEXT = 500 * MIB  # CUDA context + cuBLAS workspace + bitsandbytes kernels, per card (typ. 0.3-0.6 GiB)
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, as a share of the dynamic (non-weight) peak
OPD_CHUNK = 512  # losses.py chunk_size default: rows of (chunk, V) logits alive at once

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "float32": 4, "bfloat16": 2, "float16": 2}


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class Term:
    """One line of the estimate."""

    name: str
    bytes: float
    card: int  # 0 = the student's device, 1 = teacher_device when the teacher has a card of its own
    phase: str  # static | rollout | update | step | info (shown, not counted)
    detail: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class Proposal:
    """Rollout settings that fit, as `section.key=value` overrides."""

    settings: dict[str, Any]
    peak_gib: float
    why: str

    @property
    def overrides(self) -> str:
        return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.settings.items())


@dataclass
class Plan:
    """The estimate: terms, per-card peaks and phases, a verdict and proposals."""

    teacher: ModelShape
    student: ModelShape
    device: str  # cuda | cpu
    gpu: GPU | None
    cards: int
    dtype: str  # student compute dtype
    batch: int
    micro_batch: int
    prompt_tokens: int
    new_tokens: int
    pairs: list[tuple[int, int]]
    terms: list[Term] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)  # per card: phase -> bytes above static
    proposals: list[Proposal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    teacher_on_cpu: bool = False  # model.teacher_device=cpu with a GPU student: "card" 1 is CPU RAM
    objective: str = ""  # the objective the estimate is for (loss.objective=auto: what it is expected to pick)
    objective_reason: str = ""  # why, for loss.objective=auto; empty when the objective was given
    fit: Any = None  # fit.Fit: what train.fit=auto chose for this card, None when it did not run

    def on_gpu(self, card: int) -> bool:
        return self.device == "cuda" and not (card == 1 and self.teacher_on_cpu)

    def card_name(self, card: int) -> str:
        return "cpu" if not self.on_gpu(card) else f"cuda:{card}"

    def peak(self, card: int = 0) -> float:
        """Estimated peak bytes on `card` (0: the student's device; 1: the teacher's, when it has its own)."""
        static = sum(t.bytes for t in self.terms if t.card == card and t.phase == "static")
        dynamic = max(self.phases[card].values()) if self.phases[card] else 0.0
        slack = ALLOCATOR_SLACK * dynamic if self.on_gpu(card) else 0.0
        return static + dynamic + slack

    def peak_gib(self, card: int = 0) -> float:
        return self.peak(card) / GIB

    def limit(self) -> float | None:
        return self.gpu.mib * MIB if self.gpu is not None else None

    @property
    def fits(self) -> bool | None:
        lim = self.limit()
        return None if lim is None else all(self.peak(c) <= lim for c in range(self.cards) if self.on_gpu(c))

    def verdict(self) -> str:
        lim = self.limit()
        if lim is None:
            if self.device == "cpu":
                return (f"a CPU run: about {self.peak_gib():.1f} GiB of tensors in RAM, plus ~0.7 GiB for Python, "
                        f"torch and transformers")
            return "no card size given: pass --gpu or --vram-gb for a verdict"
        worst = max(self.peak(c) / lim for c in range(self.cards) if self.on_gpu(c))
        gpus = sum(1 for c in range(self.cards) if self.on_gpu(c))
        where = f"{self.gpu.name}" + (f" x{gpus}" if gpus > 1 else "") + (
            f" (teacher in CPU RAM: {self.peak_gib(1):.1f} GiB)" if self.teacher_on_cpu else "")
        if worst > 1:
            return f"does NOT fit on {where} ({worst:.0%} of its memory)"
        if worst > 0.9:
            return f"fits on {where}, tightly ({worst:.0%} of its memory): expect OOM on a long batch"
        return f"fits on {where} ({worst:.0%} of its memory)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher.name, "student": self.student.name, "device": self.device,
            "gpu": self.gpu.name if self.gpu else None, "gpu_gib": self.gpu.mib / 1024 if self.gpu else None,
            "cards": self.cards, "card_names": [self.card_name(c) for c in range(self.cards)], "dtype": self.dtype,
            "batch": self.batch, "micro_batch": self.micro_batch,
            "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "terms": [{"name": t.name, "gib": round(t.gib, 4), "card": t.card, "phase": t.phase,
                       "detail": t.detail} for t in self.terms],
            "peak_gib": [round(self.peak_gib(c), 3) for c in range(self.cards)], "fits": self.fits,
            "verdict": self.verdict(),
            "proposals": [{"why": p.why, "peak_gib": round(p.peak_gib, 2), "overrides": p.overrides}
                          for p in self.proposals],
            "notes": self.notes, "objective": self.objective, "objective_reason": self.objective_reason,
            "fit": self.fit.to_dict() if self.fit is not None else None,
        }


def _lora_modules(shape: ModelShape, target: Any) -> dict[str, tuple[int, int]]:
    lin = shape.linears()
    if target == "all-linear" or target is None:
        return lin
    names = [target] if isinstance(target, str) else list(target)
    return {n: lin[n] for n in names if n in lin}


def _student_layer_bytes(s: ModelShape, act: int, lora: dict[str, tuple[int, int]], r: int) -> float:
    """Bytes autograd saves per token in one student block (transformers Qwen2/Llama block, PEFT LoRA).

    Frozen base linears save nothing (their input gradient needs only the weight). PEFT casts each LoRA
    input to the adapter dtype (fp32) separately, so with a bf16/fp16 base every targeted module keeps its
    own fp32 copy of its input; in fp32 the input tensor is shared. SDPA keeps q, k, v (k/v repeated to all
    heads when a padding mask is present), its output and the log-sum-exp. r=0 is full fine-tuning: every
    linear keeps its input (shared per group, in the compute dtype) and the norms their normalised input.
    Checked against the bytes `torch.autograd.graph.saved_tensors_hooks` sees (tests/test_plan.py).
    """
    D, I = s.hidden, s.intermediate
    # repeat_kv copies k and v to all heads (a padding mask disables SDPA's native GQA); one kv head is a view
    kv = s.q_dim if 1 < s.kv_heads < s.heads else s.kv_dim
    total = 2 * 4 * D + 2 * 4  # two RMSNorms keep their fp32 input and rsqrt
    total += act * (2 * s.q_dim + 2 * kv) + 4 * s.heads  # SDPA: q, k, v, output, logsumexp
    total += 3 * act * I  # SwiGLU: gate (silu input), silu(gate) and up (the product's inputs)
    if r == 0:  # full fine-tuning: weight gradients need every linear's input and each norm's normalised input
        return total + act * (D + D + I) + 2 * act * D
    groups = {"qkv": (D, ("q_proj", "k_proj", "v_proj", "qkv_proj")), "o": (s.q_dim, ("o_proj",)),
              "gu": (D, ("gate_proj", "up_proj", "gate_up_proj")), "down": (I, ("down_proj",))}
    for group, (dim, names) in groups.items():
        n = sum(1 for m in names if m in lora)
        if not n:
            continue
        if act == 4:  # same dtype as the adapter: each input is saved once; o_proj's is SDPA's output, whose
            total += 0 if group == "o" else 4 * dim  # (B, T, H, hd) memory layout makes the reshape a view
        else:
            total += n * 4 * dim
    total += 4 * r * len(lora)  # lora_A outputs, kept for lora_B's weight gradient
    return total


Where = tuple  # _resolve's (device kind, card, student compute dtype, number of devices, teacher in CPU RAM)


def _resolve(cfg: Config, gpu: str | None, vram_gb: float | None,
             card: GPU | None = None) -> tuple[str, GPU | None, str, int, bool]:
    """(device kind, card, student compute dtype, number of devices, teacher in CPU RAM); `card`: a detected one."""
    if card is None and gpu is not None:
        key = gpu.lower().replace("rtx", "").replace("_", "-").strip("- ")
        if key not in GPUS:
            raise MinioprdError(f"unknown --gpu {gpu!r}: known are {', '.join(GPUS)} (or give --vram-gb)")
        card = GPUS[key]
        if vram_gb is not None:
            card = GPU(f"{card.name}, {vram_gb:g} GiB", int(vram_gb * 1024), card.bf16)
    elif card is None and vram_gb is not None:
        if vram_gb <= 0:
            raise MinioprdError(f"--vram-gb must be > 0, got {vram_gb}")
        card = GPU(f"a {vram_gb:g} GiB card", int(vram_gb * 1024), True)
    device = "cuda" if card is not None or cfg.model.device.startswith("cuda") else \
        ("cpu" if cfg.model.device == "cpu" else "cuda")
    if device == "cpu":
        dtype = {"auto": "fp32"}.get(cfg.model.dtype, cfg.model.dtype)
    else:
        dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bf16" if card is None or card.bf16 else "fp16")
    two = device == "cuda" and cfg.model.teacher_device not in ("same", cfg.model.device, "cuda") \
        and not (cfg.model.teacher_device == "cuda:0" and cfg.model.device in ("auto", "cuda", "cuda:0"))
    return device, card, dtype, 2 if two else 1, two and cfg.model.teacher_device == "cpu"


def _plan_for(cfg: Config, t: ModelShape, s: ModelShape, where: Where, prompt_tokens: int | None) -> Plan:
    """The estimate for a config whose objective is concrete (not auto), no proposals."""
    from minioprd.layers import layer_map

    device, card, dtype, cards, teacher_on_cpu = where
    pairs = layer_map(cfg.loss.layers, s.layers, t.layers, cfg.loss.teacher_layers)
    P = prompt_tokens or cfg.data.max_prompt_tokens
    R = cfg.rollout.max_new_tokens
    B = cfg.rollout.prompts_per_step * cfg.rollout.n
    mb = min(cfg.rollout.micro_batch or B, B)
    p = Plan(t, s, device, card, cards, dtype, B, mb, P, R, pairs, teacher_on_cpu=teacher_on_cpu,
             objective=cfg.loss.objective)
    _fill(p, cfg)
    return p


def likely_same_tokenizer(t: ModelShape, s: ModelShape) -> bool:
    """From configs alone: vocabularies within 1% of each other (Qwen2.5-7B pads 152064 rows, 0.5B 151936)
    are taken as one tokenizer; `distill` compares the tokenizers themselves when it loads them."""
    return abs(t.vocab - s.vocab) <= 0.01 * max(t.vocab, s.vocab)


def objective_for_plan(cfg: Config, t: ModelShape, s: ModelShape, where: Where,
                       prompt_tokens: int | None = None) -> tuple[Config, str, str]:
    """(config with a concrete objective, that objective, why) for the estimate.

    loss.objective=auto: what `objective.shape_hint` expects auto to pick from the shapes; the OPRD-Bridge
    (another tokenizer) is planned as oprd (its r-dim maps are small next to width projections). The same
    shape is decided only by the measurement at step 0, so the plan takes the costlier of oprd and the
    output-space candidate. An explicit objective is planned as given.
    """
    if cfg.loss.objective != "auto":
        return cfg, cfg.loss.objective, ""
    from minioprd.objective import APART, shape_hint

    same_tok = likely_same_tokenizer(t, s)
    hint = shape_hint((s.layers, s.hidden), (t.layers, t.hidden), same_tok)
    tok_note = "" if same_tok else f" (vocabularies of {t.vocab} and {s.vocab} ids)"

    def with_objective(objective: str) -> Config:
        c = copy.deepcopy(cfg)
        c.loss.objective = objective
        return c

    if hint.objective == "bridge":
        return with_objective("oprd"), "oprd", f"auto: OPRD-Bridge{tok_note}: {hint.reason} (planned as oprd)"
    if hint.objective is not None:
        return with_objective(hint.objective), hint.objective, f"auto: {hint.objective}: {hint.reason}"
    peaks = {}
    for objective in ("oprd", APART):
        c = with_objective(objective)
        q = _plan_for(c, t, s, where, prompt_tokens)
        peaks[objective] = (max(q.peak(k) for k in range(q.cards)), c)
    costlier = max(peaks, key=lambda o: peaks[o][0])
    return peaks[costlier][1], costlier, (f"auto: oprd or {APART}, {hint.reason}; planned for the costlier, "
                                          f"{costlier} ({peaks[costlier][0] / GIB:.1f} vs "
                                          f"{min(v for v, _ in peaks.values()) / GIB:.1f} GiB)")


@dataclass
class _Sizes:
    """What the weight terms decide and the later phases use."""

    teacher_weights: float
    t_act: int  # bytes per element of the teacher's activations, and their dtype
    t_dt: str
    s_act: int  # the same for the student
    s_dt: str
    lora: dict[str, tuple[int, int]]  # the trained linears of one student block
    n_lora: int  # trained parameters (LoRA, or every weight with lora.r=0) and their gradients' bytes each
    g_bytes: int
    n_proj: int  # width-projection parameters
    full: bool  # lora.r=0
    deq: float  # a dequantized teacher weight matrix (4/8-bit teacher), alive during its forward

    def kv_per_token(self, s: ModelShape) -> float:
        return s.layers * 2 * s.kv_dim * self.s_act


def _fill(p: Plan, cfg: Config) -> None:
    """The terms and per-card phase peaks of `p`: weights, rollout, update, step, in-loop eval."""
    terms: list[Term] = []

    def add(name: str, nbytes: float, phase: str, card: int = 0, detail: str = "") -> float:
        terms.append(Term(name, float(nbytes), card, phase, detail))
        return float(nbytes)

    tc = 1 if p.cards == 2 else 0  # the teacher's card
    w = _weight_terms(p, cfg, add, tc)
    phases: list[dict[str, float]] = [dict() for _ in range(p.cards)]
    phases[0]["rollout"] = _rollout_terms(p, cfg, w, add)
    _update_terms(p, cfg, w, add, tc, phases)
    if cfg.train.eval_every:
        _eval_terms(p, cfg, w, add, tc, phases)
    if cfg.loss.objective == "oprd":  # not counted: what an output-space OPD term would add
        V = min(p.teacher.vocab, p.student.vocab)
        rows = p.batch * _loss_window(p, cfg)
        lc = cfg.loss
        add("(not counted) OPD logits, chunked", 5 * lc.opd_chunk * V * 4 + rows * (p.student.hidden
                                                                                  + p.teacher.hidden) * 4, "info",
            0, f"only with loss.objective=opd_*: {lc.opd_chunk}-row chunks of (chunk, V={V}) fp32; "
            f"unchunked (B*R, V) logits would be {3 * rows * V * 4 / GIB:.1f} GiB")
    p.terms, p.phases = terms, phases
    _notes(p, cfg, w.teacher_weights, tc)


def _loss_window(p: Plan, cfg: Config) -> int:
    """Columns of the loss (an upper bound): the first k response tokens, or all R."""
    lc = cfg.loss
    need_opd = lc.objective != "oprd"
    return min(lc.k, p.new_tokens) if (lc.positions == "first_k" and not need_opd) else p.new_tokens


def _prefill_bytes(rows: int, cols: int, shape: ModelShape, act: int, cast: bool) -> float:
    """One block's no-grad temporaries over rows x cols tokens, plus the mask and SDPA's float copy."""
    per_tok = act * (3 * shape.intermediate + 2 * shape.q_dim + 2 * shape.hidden) + 12 * shape.hidden \
        + (4 * max(shape.hidden, shape.intermediate) if cast else 0)  # PEFT's fp32 cast of a LoRA input
    return rows * cols * per_tok + rows * cols * cols * (1 + act)


def _weight_terms(p: Plan, cfg: Config, add: Callable[..., float], tc: int) -> _Sizes:
    """static: weights, adapter, optimizer state, projections, CUDA context."""
    t, s, b = p.teacher, p.student, DTYPE_BYTES[p.dtype]
    ckpt = DTYPE_BYTES.get(t.dtype, 2)
    if cfg.model.teacher_quant == "4bit":
        tw = t.linear_params() * NF4_BITS / 8 + t.other_params() * ckpt
        how = f"NF4 {NF4_BITS:.3f} bit x {t.linear_params() / 1e9:.2f}B linear + {t.other_params() / 1e9:.2f}B " \
              f"embeddings/norms in {t.dtype}"
        t_act, t_dt = ckpt, t.dtype  # hidden states follow the unquantized embedding
    elif cfg.model.teacher_quant == "8bit":
        rows = t.layers * sum(o for _, o in t.linears().values())
        tw = t.linear_params() + 4 * rows + t.other_params() * ckpt
        how = f"int8 x {t.linear_params() / 1e9:.2f}B linear + row scales + {t.other_params() / 1e9:.2f}B in {t.dtype}"
        t_act, t_dt = ckpt, t.dtype
    else:
        t_act, t_dt = (2, "bf16") if p.on_gpu(tc) else (4, "fp32")  # load_teacher: bf16 on GPU, fp32 on CPU
        tw = t.params() * t_act
        how = f"{t.params() / 1e9:.2f}B x {t_act} bytes"
    add(f"teacher weights ({t.name})", tw, "static", tc, how)

    full = cfg.lora.r == 0
    if cfg.model.student_quant == "4bit":  # prepare_model_for_kbit_training upcasts the rest to fp32 ...
        sw = s.linear_params() * NF4_BITS / 8 + s.other_params() * 4
        how = f"QLoRA: NF4 linear + {s.other_params() / 1e9:.2f}B embeddings/norms upcast to fp32"
        s_act, s_dt = 4, "fp32"  # ... so the residual stream, and every activation, is fp32
    else:
        sw = s.params() * b
        how = f"{s.params() / 1e9:.3f}B x {b} bytes ({p.dtype})"
        s_act, s_dt = b, p.dtype
    add(f"student weights ({s.name})", sw, "static", 0, how)

    lora = s.linears() if full else _lora_modules(s, cfg.lora.target_modules)
    if full:  # every weight trains; AdamW keeps its moments in the parameters' dtype
        n_lora, g_bytes = s.params(), b
        add("AdamW moments, full fine-tuning (2 x weights)", 2 * b * n_lora, "static", 0, "lora.r=0")
    else:
        n_lora, g_bytes = s.layers * cfg.lora.r * sum(i + o for i, o in lora.values()), 4
        add("LoRA adapter (fp32)", 4 * n_lora, "static", 0,
            f"{n_lora:,} params, r={cfg.lora.r}, {len(lora)} modules/block")
        add("AdamW moments of LoRA (2 x fp32)", 8 * n_lora, "static", 0, "exist from the first step on")
    # prepare makes width projections only where a representation term uses them (not for OPD alone, e.g. auto's
    # opd_full across widths)
    n_proj = len(p.pairs) * s.hidden * t.hidden if s.hidden != t.hidden and cfg.loss.has_representation_term() \
        else 0
    if n_proj:
        add("projections + AdamW (fp32, 3 copies)", 12 * n_proj, "static", 0,
            f"{len(p.pairs)} x Linear({s.hidden}->{t.hidden}) = {n_proj:,} params")
    if p.device == "cuda":
        for c in range(p.cards):
            if p.on_gpu(c):
                add("CUDA context, cuBLAS, kernels" + (" (teacher card)" if c == 1 else ""), CUDA_CONTEXT, "static",
                    c, "not visible to torch.cuda.memory_allocated; ~0.3-0.6 GiB")
    deq = max(i * o for i, o in t.linears().values()) * 2 if cfg.model.teacher_quant != "none" else 0
    return _Sizes(tw, t_act, t_dt, s_act, s_dt, lora, n_lora, g_bytes, n_proj, full, deq)


def _rollout_terms(p: Plan, cfg: Config, w: _Sizes, add: Callable[..., float]) -> float:
    """rollout: the KV cache and generate's temporaries; returns the phase's bytes above static."""
    s, B, P, R, T = p.student, p.batch, p.prompt_tokens, p.new_tokens, p.prompt_tokens + p.new_tokens
    s_act = w.s_act
    # rollout.cache=static (auto on a GPU): allocated once for T rounded up to the bucket and kept between steps
    static_kv = cfg.rollout.cache == "static" or (cfg.rollout.cache == "auto" and p.device == "cuda")
    if static_kv:
        T_kv = -(-T // CACHE_BUCKET) * CACHE_BUCKET
        kv = add("rollout KV cache (static, kept between steps)", w.kv_per_token(s) * B * T_kv, "static", 0,
                 f"{s.layers} L x 2 x {s.kv_heads} kv x {s.hd} x B={B} x {T_kv} (P={P} + R={R} rounded up to "
                 f"{CACHE_BUCKET}) x {s_act} B")
    else:
        kv = add("rollout KV cache", w.kv_per_token(s) * B * T, "rollout", 0,
                 f"{s.layers} L x 2 x {s.kv_heads} kv x {s.hd} x B={B} x (P={P} + R={R}) x {s_act} B")

    prefill = _prefill_bytes(B, P, s, s_act, s_act != 4 and not w.full)
    sample = B * s.vocab * (s_act + 4 + 4 + 8)  # last-token logits, fp32 copy, probs, int64 scratch
    growth = 0 if static_kv else 2 * B * T * s.kv_dim * s_act  # DynamicCache grows by torch.cat: K, V copied
    roll_tr = add("rollout temporaries (prefill block / sampling)", max(prefill, sample + growth), "rollout", 0,
                  f"prefill {prefill / MIB:.0f} MiB vs sampling {(sample + growth) / MIB:.0f} MiB")
    return (0 if static_kv else kv) + roll_tr


def _update_terms(p: Plan, cfg: Config, w: _Sizes, add: Callable[..., float], tc: int,
                  phases: list[dict[str, float]]) -> None:
    """update (per micro-batch: gradients, teacher targets, activations kept for backward, loss) and step."""
    t, s, mb, T = p.teacher, p.student, p.micro_batch, p.prompt_tokens + p.new_tokens
    lc = cfg.loss
    need_rep, need_opd = lc.has_representation_term(), lc.objective != "oprd"
    t_act, t_dt, s_act, s_dt, lora, full = w.t_act, w.t_dt, w.s_act, w.s_dt, w.lora, w.full
    grads = add(("student" if full else "LoRA") + " + projection grads", w.g_bytes * w.n_lora + 4 * w.n_proj,
                "update", 0)
    t_layers = ({tl for _, tl in p.pairs} if need_rep else set()) | ({t.layers} if need_opd else set())
    s_deep = max(([sl for sl, _ in p.pairs] if need_rep else []) + ([s.layers] if need_opd else []))
    t_deep = max(t_layers)
    W = _loss_window(p, cfg)
    norm = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    same = norm.get(t_dt, t_dt) == norm.get(s_dt, s_dt) and tc == 0
    kept_cols = T if same else W  # .to(device, dtype) copies only the window; a no-op keeps the whole view
    targets = add("teacher targets kept", len(t_layers) * mb * kept_cols * t.hidden * (t_act if same else s_act),
                  "update", 0, f"{len(t_layers)} layers x mb={mb} x {kept_cols} cols x d_T={t.hidden}"
                  + ("" if same else f" (copied to the student's {'card' if tc else 'dtype'})"))
    deq = w.deq
    t_tr = _prefill_bytes(mb, T, t, t_act, False) + deq
    t_transient = add("teacher forward temporaries (one block)", t_tr, "update", tc,
                      f"mb={mb} x {T} tokens, {t_deep} of {t.layers} blocks run; dequantized weight "
                      f"{deq / MIB:.0f} MiB")
    per_tok_layer = _student_layer_bytes(s, s_act, lora, 0 if full else cfg.lora.r)
    mask_layer = mb * T * T * s_act  # SDPA keeps the padding mask, converted to a float bias, in every block
    layer_bytes = mb * T * per_tok_layer + mask_layer
    if cfg.lora.gradient_checkpointing:
        acts = s_deep * mb * T * s_act * s.hidden + layer_bytes
        how = f"checkpointing: {s_deep} block inputs + 1 block recomputed ({per_tok_layer / 1024:.1f} KiB/token/block)"
    else:
        acts = s_deep * layer_bytes
        how = f"{s_deep} blocks x mb={mb} x {T} tokens x {per_tok_layer / 1024:.1f} KiB/token" \
              + f" + {mask_layer / MIB:.0f} MiB mask per block"
    s_acts = add("student activations kept for backward", acts, "update", 0, how)
    loss_b = 0.0
    if need_rep:  # fp32 copies of bf16 states (kept: checkpoint inputs); one layer's projection and
        # differences at a time, since losses.representation_loss recomputes them in backward
        n_rep = len(p.pairs)
        loss_b += n_rep * mb * W * (4 * s.hidden if s_act != 4 else 0) + 3 * mb * W * t.hidden * 4
        loss_b += n_rep * mb * T * s.hidden * s_act if s_act != 4 else 0
    opd_b = 0.0
    if need_opd:  # checkpointed (chunk, V) fp32 logits: log-softmax of both models, probabilities, gradient
        V = min(t.vocab, s.vocab)
        opd_b = 5 * min(lc.opd_chunk, mb * W) * V * 4 + mb * W * (s.hidden + t.hidden) * 4
    loss_t = add("loss activations (fp32)" + (" incl. OPD logit chunks" if need_opd else ""), loss_b + opd_b,
                 "update", 0, (f"{len(p.pairs)} layers x mb x W={W}" if need_rep else "")
                 + (f"; OPD {lc.objective}: {lc.opd_chunk}-row chunks of (chunk, V) fp32" if need_opd else ""))
    # backward through a block: the gradients of its widest tensors (SwiGLU's gate/up, the residual) at once
    bwd = add("backward work space (one block's gradients)", mb * T * (2 * s.intermediate + 4 * s.hidden) * s_act,
              "update", 0, "measured on CPU: 0.4-0.55 of the block's saved activations")
    if tc == 1:
        phases[0]["update"] = grads + targets + s_acts + loss_t + bwd
        captured = len(t_layers) * mb * T * t.hidden * t_act
        phases[1]["update"] = t_transient + captured + (min(lc.opd_chunk, mb * W) * t.vocab * 6 if need_opd else 0)
    else:
        phases[0]["update"] = grads + targets + max(t_transient, s_acts + loss_t + bwd)
    if p.device == "cuda":  # foreach AdamW: one temporary of all trainables (CPU's for-loop AdamW: one at a time)
        phases[0]["step"] = grads + add("AdamW step temporaries", w.g_bytes * w.n_lora + 4 * w.n_proj, "step", 0)


def _eval_terms(p: Plan, cfg: Config, w: _Sizes, add: Callable[..., float], tc: int,
                phases: list[dict[str, float]]) -> None:
    """in-loop evaluation (train.eval_every): greedy rollouts, then both models' states on them at once."""
    t, s, P = p.teacher, p.student, p.prompt_tokens
    t_act, s_act, full, deq, kv_tok = w.t_act, w.s_act, w.full, w.deq, w.kv_per_token(p.student)
    Be, Te = cfg.eval.batch_size, P + cfg.eval.max_new_tokens
    ev = kv_tok * Be * Te + max(_prefill_bytes(Be, P, s, s_act, s_act != 4 and not full), Be * s.vocab * 20)
    if cfg.eval.alignment:  # alignment_report keeps every mapped layer's full output of both models
        n_t = len({tl for _, tl in p.pairs} | {t.layers})
        n_s = len({sl for sl, _ in p.pairs} | {s.layers})
        s_states, t_states = n_s * Be * Te * s.hidden * s_act, n_t * Be * Te * t.hidden * t_act
        kl = 5 * OPD_CHUNK * min(s.vocab, t.vocab) * 4  # reverse KL per token, in chunks of logits
        t_fwd = _prefill_bytes(Be, Te, t, t_act, False) + deq
        if tc == 1:
            phases[1]["eval"] = t_states + t_fwd
            ev = max(ev, s_states + n_t * Be * Te * t.hidden * s_act + max(_prefill_bytes(Be, Te, s, s_act, False),
                                                                            kl))
        else:
            ev = max(ev, s_states + t_states + max(t_fwd, kl))
    phases[0]["eval"] = add("in-loop eval (rollouts, then both models' states)", ev, "eval", 0,
                            f"eval.batch_size={Be} x {Te} tokens; lower eval.batch_size if this is the peak")


def _notes(p: Plan, cfg: Config, teacher_weights: float, tc: int) -> None:
    lim = p.limit()
    if lim is not None and p.on_gpu(tc) and teacher_weights + CUDA_CONTEXT > lim:
        p.notes.append(f"the teacher's weights alone ({teacher_weights / GIB:.1f} GiB) exceed the card: use "
                       f"model.teacher_quant=4bit, a second card (model.teacher_device=cuda:1), a smaller teacher, "
                       f"or the whole teacher in CPU RAM (model.teacher_device=cpu: fits, but every teacher forward "
                       f"runs on the CPU)")
    if p.teacher_on_cpu:
        p.notes.append("the teacher runs in CPU RAM (model.teacher_device=cpu): its forward over each micro-batch "
                       "runs on the CPU, expect it to dominate the step time")
    if not cfg.lora.gradient_checkpointing:
        p.notes.append("lora.gradient_checkpointing=true trades ~30% speed for most of the activation term")
    if p.micro_batch == p.batch and p.batch > 1:
        p.notes.append("rollout.micro_batch (e.g. 1 or 2) shrinks every update-phase term; the rollout is unaffected")


LENGTHS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768)
PROMPT_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _proposals(cfg: Config, base: Plan, prompt_tokens: int | None) -> list[Proposal]:
    """Largest rollouts that fit: the longest response at the configured prompts per step, the most prompts at
    the configured length, the most tokens per step (B x R); and, when the run has no gradient checkpointing or
    large micro-batches, the most tokens per step with both memory savers on."""
    lim = base.limit()
    if lim is None:
        return []

    def peak(c: Config, pps: int, r: int) -> float:
        c = copy.deepcopy(c)
        c.rollout.prompts_per_step, c.rollout.max_new_tokens = pps, r
        q = _quick(c, base, prompt_tokens)
        return max(q.peak(k) for k in range(q.cards))

    def most_tokens(c: Config) -> tuple[int, int] | None:
        best = None
        for r in LENGTHS:
            if r < 256:
                continue
            ks = [k for k in PROMPT_COUNTS if peak(c, k, r) <= lim]
            if ks and (best is None or ks[-1] * r >= best[0] * best[1]):
                best = (ks[-1], r)
        return best

    out: list[Proposal] = []
    pps0, r0 = cfg.rollout.prompts_per_step, cfg.rollout.max_new_tokens
    lengths = sorted(set(LENGTHS) | {r0})
    fit_r = [r for r in lengths if peak(cfg, pps0, r) <= lim]
    if fit_r:
        out.append(Proposal({"rollout.max_new_tokens": fit_r[-1]}, peak(cfg, pps0, fit_r[-1]) / GIB,
                            f"longest response at {pps0} prompts x n={cfg.rollout.n}"))
    fit_p = [k for k in range(1, 65) if peak(cfg, k, r0) <= lim]
    if fit_p:
        out.append(Proposal({"rollout.prompts_per_step": fit_p[-1]}, peak(cfg, fit_p[-1], r0) / GIB,
                            f"most prompts per step at {r0} new tokens"))
    best = most_tokens(cfg)
    if best is not None:
        out.append(Proposal({"rollout.prompts_per_step": best[0], "rollout.max_new_tokens": best[1]},
                            peak(cfg, *best) / GIB, "most tokens per step (B x R)"))
    mb = min(2, cfg.rollout.prompts_per_step * cfg.rollout.n)
    if not cfg.lora.gradient_checkpointing or not cfg.rollout.micro_batch or cfg.rollout.micro_batch > mb:
        lean = copy.deepcopy(cfg)
        lean.lora.gradient_checkpointing, lean.rollout.micro_batch = True, 2
        best_lean = most_tokens(lean)
        if best_lean is not None and (best is None or best_lean[0] * best_lean[1] > best[0] * best[1]):
            out.append(Proposal({"lora.gradient_checkpointing": True, "rollout.micro_batch": 2,
                                 "rollout.prompts_per_step": best_lean[0], "rollout.max_new_tokens": best_lean[1]},
                                peak(lean, *best_lean) / GIB, "most tokens per step with checkpointing and "
                                "micro-batches of 2"))
    return out


def _quick(cfg: Config, base: Plan, prompt_tokens: int | None) -> Plan:
    """Re-plan with the base plan's shapes and card (no file or hub look-ups)."""
    return _plan_for(cfg, base.teacher, base.student, where_of(base), prompt_tokens)


def where_of(p: Plan) -> Where:
    """A plan's device, card, dtype, cards and teacher placement, as `_resolve` returns them."""
    return p.device, p.gpu, p.dtype, p.cards, p.teacher_on_cpu
