"""`minioprd demo`: OPRD working end to end on a laptop CPU in minutes, and `minioprd demo --compare`, a
small-scale reproduction of the paper's comparison (OPRD vs output-space OPD, paper Table 2).

The task is `builtin:arithmetic` (2-digit sums and differences, answered by a short chain of column steps
and `\\boxed{}`), with the offline ChatML tokenizer of `tiny.py` and tiny Qwen2 models (the normal HF code
path). The paper's setting is rebuilt in miniature (`build_pairs`, cached under `$MINIOPRD_HOME/demo/`):

  student       a Qwen2 (2 blocks, width 64) trained with cross-entropy on the reference solutions until its
                validation accuracy first reaches ~25%;
  teacher       the same run, `teacher_steps` further: a further-trained copy of the student (shared origin,
                like JustRL-1.5B from R1-Distill-1.5B);
  wide teacher  a wider, deeper Qwen2 (3 blocks, width 96) trained separately from scratch: a different origin
                and width, so the width projections (and the limits of vanilla OPRD) are exercised.

`minioprd demo` distills the student with OPRD towards the shared-origin teacher (LoRA r=16, lr 1e-2, 100
steps of 16 prompts x 4 rollouts at T=1) and with the package default, loss.objective=auto, towards the wide one,
where it picks opd_full: vanilla OPRD collapses there (the paper's stated limitation: it needs aligned
representations). `minioprd demo --compare` runs
every objective (METHODS, with OPRD-Bridge rows on the wide pairing: `demo_bridge` fits the bridge once) and
the OPRD knobs (KNOBS) with 3 seeds, each at the learning rate it does best with on the validation split (same
grid for all), and resumes from its finished runs.

    from minioprd.demo import run_demo, run_compare
    report = run_demo("runs/demo")                 # -> report.json, demo.png
    table = run_compare("runs/compare", seeds=3)   # -> compare.json, compare.md, compare.png

Accuracy is greedy on the 200 test problems, graded with `grading.grade`; reverse KL(student || teacher) per
token and the hidden-state cosine (all layers, proportional map) are measured on the evaluated student's
own greedy responses. Learning rates are picked on a separate 200-problem validation split, never on test.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from minioprd.errors import MinioprdError
from minioprd.files import atomic_write_json, atomic_write_text, build_once, read_jsonl
from minioprd.report import save_png

PAIR_VERSION = "v1"
VOCAB_ROWS = 512
# name -> (hidden, layers, heads, kv heads, mlp)
ARCHS = {"small": (64, 2, 4, 2, 256), "wide": (96, 3, 4, 2, 256)}
MAX_NEW_TOKENS = 32  # the longest reference solution is 28 tokens + EOS
PAIRINGS = ("shared", "wide")  # shared-origin teacher, wider/deeper teacher trained from scratch

# One on-policy step: 16 prompts x 4 samples at T=1, 32 new tokens at most; LoRA r=16 on every linear layer.
BASE_SETTINGS: dict[str, Any] = {
    "model.teacher_quant": "none", "model.device": "cpu", "lora.r": 16, "lora.alpha": 32,
    "data.dataset": "builtin:arithmetic", "data.chat_template": "true", "data.prompt_suffix": "",
    "rollout.prompts_per_step": 16, "rollout.n": 4, "rollout.temperature": 1.0,
    "rollout.max_new_tokens": MAX_NEW_TOKENS, "loss.objective": "oprd", "loss.kind": "scale_mse",
    "loss.layers": "all", "loss.positions": "all", "loss.convention": "predict", "train.steps": 100,
    "train.lr": 1e-2, "train.eval_every": 10, "train.threads": 1, "eval.keep_best": False,
    "loss.projection_init": "random",  # what the recorded comparison ran with; the oprd_lstsq row overrides it
}
DEMO_LR = 1e-2  # OPRD, LoRA r=16 on the tiny student; picked on the validation split (see `--compare`)

# The methods of the comparison: config overrides (`sft_teacher` is the off-policy reference, sft.py).
METHODS: dict[str, dict[str, Any]] = {
    "oprd": {"loss.objective": "oprd"},
    "opd_sampled": {"loss.objective": "opd_sampled"},
    "opd_topk": {"loss.objective": "opd_topk", "loss.topk": 16},
    "opd_full": {"loss.objective": "opd_full"},
    "opd_topk+oprd": {"loss.objective": "opd_topk", "loss.topk": 16, "loss.mu": 1.0},  # L_OPD + mu * L_OPRD
    "opd_full+oprd": {"loss.objective": "opd_full", "loss.mu": 1.0},
    "sft_teacher": {},
    # width projections fitted by least squares before the first step (loss.projection_init=lstsq) instead of
    # random: only differs where widths differ, so it runs on the wide pairing only
    "oprd_lstsq": {"loss.objective": "oprd", "loss.projection_init": "lstsq"},
    # OPRD-Bridge (paper §3, Eqs. 11-15), the paper's answer for models that differ: a frozen rank-8 subspace
    # fitted on the student's rollouts before training (`minioprd bridge`), alone and as OPD's extra term
    "oprd_bridge": {"loss.objective": "oprd", "loss.bridge": "{bridge}", "loss.kind": "normalized_mse",
                    "loss.coef": 10.0},
    "opd_full+oprd_bridge": {"loss.objective": "opd_full", "loss.mu": 1.0, "loss.bridge": "{bridge}",
                             "loss.kind": "normalized_mse", "loss.coef": 10.0},
}
WIDE_ONLY = ("oprd_lstsq", "oprd_bridge", "opd_full+oprd_bridge")
BRIDGE_RANK = 8  # the paper's rank
# OPRD knobs, each its own row on the shared-origin pairing (at OPRD's learning rate unless it has a grid).
KNOBS: dict[str, dict[str, Any]] = {
    "oprd/token": {"loss.objective": "oprd", "loss.convention": "token"},  # the authors' position convention
    "oprd/mse": {"loss.objective": "oprd", "loss.kind": "mse"},  # raw ||h_S-h_T||^2/d (paper Eq. 6)
    "oprd/normalized_mse": {"loss.objective": "oprd", "loss.kind": "normalized_mse"},  # L2-normalised first
    "oprd/last_layer": {"loss.objective": "oprd", "loss.layers": "last"},
    "oprd/last_k=8": {"loss.objective": "oprd", "loss.positions": "last_k", "loss.k": 8},  # ~1/3 of a response
    "oprd/full_ft": {"loss.objective": "oprd", "lora.r": 0},  # every weight trains (its own lr grid)
    "opd_full/full_ft": {"loss.objective": "opd_full", "lora.r": 0},
    "opd_full+oprd/mu=10": {"loss.objective": "opd_full", "loss.mu": 10.0},  # the paper's larger mu
}
KNOB_LR_FROM = {"opd_full+oprd/mu=10": "opd_full+oprd"}  # other knob rows (without a grid) use OPRD's rate
# What `minioprd demo` runs on each pairing, at the rates `minioprd demo --compare` picked on validation. The wide
# pairing runs the package default, loss.objective=auto: it picks opd_full there (the widths differ), so it runs at
# opd_full's rate; the shared row stays pinned to oprd, as recorded.
DEMO_METHODS = {"shared": "oprd", "wide": "auto"}
DEMO_ONLY = {"auto": {"loss.objective": "auto"}}  # demo methods that are not rows of the comparison
DEMO_LRS = {("shared", "oprd", "lora"): 1e-2, ("shared", "oprd", "full"): 3e-3,
            ("wide", "opd_full+oprd", "lora"): 1e-3, ("shared", "opd_full+oprd", "lora"): 3e-3,
            ("wide", "auto", "lora"): 1e-3, ("wide", "opd_full", "lora"): 1e-3}


def demo_lr(pairing: str, method: str, lora_r: int) -> float:
    """The demo's learning rate of `method` on `pairing` (LoRA, or full fine-tuning when lora_r=0)."""
    return DEMO_LRS.get((pairing, method, "lora" if lora_r else "full"), DEMO_LR if lora_r else DEMO_LR / 3)


LORA_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # half-decade steps; the same grid for every method
FULL_LRS = (3e-4, 1e-3, 3e-3, 1e-2)


def _say(_m: str) -> None:
    pass


# --------------------------------------------------------------------------------------------- task


def task_splits() -> dict[str, list[Any]]:
    """train (the builtin 2000), val (200 more, for picking checkpoints and learning rates), test (the builtin
    200); no question is in two splits."""
    from minioprd.data import arithmetic_examples, load_examples

    train = load_examples("builtin:arithmetic", split="train")
    test = load_examples("builtin:arithmetic", split="test")
    seen = {str(e.prompt) for e in train} | {str(e.prompt) for e in test}
    val = arithmetic_examples(200, seed=2, exclude=seen)
    return {"train": train, "val": val, "test": test}


def encode_prompts(tokenizer: Any, examples: list[Any]) -> list[list[int]]:
    """The ChatML prompts (no suffix) as token ids, exactly as `distill.prepare` renders them."""
    from minioprd.data import render_prompts

    return tokenizer(render_prompts(tokenizer, examples, suffix="", chat_template="true"),
                     add_special_tokens=False)["input_ids"]


def new_model(arch: str, tokenizer: Any, seed: int) -> Any:
    """A randomly initialised Qwen2 of shape `ARCHS[arch]` from a standard HF config."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    hidden, layers, heads, kv, mlp = ARCHS[arch]
    cfg = Qwen2Config(vocab_size=VOCAB_ROWS, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------------------------- evaluation


class TaskEval:
    """Greedy accuracy on a list of examples; given the teacher also the per-token reverse KL(student ||
    teacher) and the hidden-state cosine to it, both on the evaluated model's own greedy responses."""

    def __init__(self, tokenizer: Any, examples: list[Any], max_new_tokens: int = MAX_NEW_TOKENS,
                 batch_size: int = 256):
        self.tokenizer, self.examples = tokenizer, list(examples)
        self.prompts = encode_prompts(tokenizer, self.examples)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    @torch.no_grad()
    def __call__(self, model: Any, teacher: Any = None, pairs: list[tuple[int, int]] | None = None,
                 projections: Any = None) -> dict[str, float]:
        """`pairs`: (student, teacher) hidden_states indices for the cosine; a pair of different widths needs
        `projections` (one per pair), else no cosine is reported."""
        from minioprd.grading import grade
        from minioprd.rollout import rollout

        was_training = model.training
        model.eval()
        correct = kl_sum = tokens = 0.0
        cos_sum: torch.Tensor | None = None
        with torch.random.fork_rng(devices=[]):  # greedy, but never disturb the training run's RNG
            for lo in range(0, len(self.prompts), self.batch_size):
                ro = rollout(model, self.tokenizer, self.prompts[lo:lo + self.batch_size], n=1, temperature=0.0,
                             max_new_tokens=self.max_new_tokens)
                rows = [r[m].tolist() for r, m in zip(ro.responses.cpu(), ro.response_mask.cpu())]
                texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
                for text, ex in zip(texts, self.examples[lo:lo + self.batch_size]):
                    correct += grade(text, ex.answer).correct
                if teacher is not None:
                    kl, n, cos = _alignment(model, teacher, ro, pairs, projections)
                    kl_sum, tokens = kl_sum + kl, tokens + n
                    if cos is not None:
                        cos_sum = cos if cos_sum is None else cos_sum + cos
        model.train(was_training)
        out = {"acc": correct / len(self.prompts)}
        if teacher is not None:
            out["kl"] = kl_sum / max(tokens, 1.0)
            if cos_sum is not None:
                per_layer = cos_sum / max(tokens, 1.0)
                out["cos"] = float(per_layer.mean())
                out["cos_last"] = float(per_layer[-1])
        return out


def _alignment(model: Any, teacher: Any, ro: Any, pairs: Any, projections: Any) -> tuple[float, float, Any]:
    """(sum of per-token reverse KL, number of tokens, per-pair sums of cosines or None) on one rollout."""
    P, mask = ro.prompt_len, ro.response_mask  # the state at column P+j-1 predicts response token j
    kw = dict(attention_mask=ro.attention_mask, position_ids=ro.position_ids(), output_hidden_states=True,
              use_cache=False)
    s_out, t_out = model(input_ids=ro.input_ids, **kw), teacher(input_ids=ro.input_ids, **kw)
    cols = slice(P - 1, P - 1 + mask.shape[1])
    V = min(s_out.logits.shape[-1], t_out.logits.shape[-1])
    ls = torch.log_softmax(s_out.logits[:, cols, :V].float(), -1)
    lt = torch.log_softmax(t_out.logits[:, cols, :V].float(), -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)[mask]
    if not pairs:
        return float(kl.sum()), float(kl.numel()), None
    sums = []
    for i, (a, b) in enumerate(pairs):
        hs, ht = s_out.hidden_states[a][:, cols][mask].float(), t_out.hidden_states[b][:, cols][mask].float()
        if hs.shape[-1] != ht.shape[-1]:
            if projections is None or len(projections) != len(pairs):
                return float(kl.sum()), float(kl.numel()), None
            hs = projections[i](hs)
        sums.append(torch.nn.functional.cosine_similarity(hs, ht, dim=-1).sum())
    return float(kl.sum()), float(kl.numel()), torch.stack(sums).cpu()


# --------------------------------------------------------------------------------------------- the model pairs


@dataclass
class PairRecipe:
    """How the demo's models are trained: cross-entropy on the train split's reference solutions, batches of
    64, AdamW; checkpoints chosen on the validation split."""

    lr: float = 3e-3
    batch_size: int = 64
    eval_every: int = 25
    student_acc: float = 0.25  # the student is the first checkpoint at or above this validation accuracy
    student_max_steps: int = 1000
    teacher_steps: int = 400  # the same run, this many steps further (cosine decay to 10% of lr)
    wide_steps: int = 500  # the wider/deeper teacher, from scratch (warm-up, then cosine decay)
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"version": PAIR_VERSION, "archs": ARCHS, **asdict(self)}, sort_keys=True)
        return f"pairs-{PAIR_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


@dataclass
class Pairs:
    root: Path
    meta: dict[str, Any]

    @property
    def student(self) -> Path:
        return self.root / "student"

    def teacher(self, pairing: str) -> Path:
        if pairing not in PAIRINGS:
            raise MinioprdError(f"unknown pairing {pairing!r}: choose from {', '.join(PAIRINGS)}")
        return self.root / ("teacher" if pairing == "shared" else "wide-teacher")


def _decay(start: int, steps: int, floor: float = 0.1) -> Callable[[int], float]:
    return lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / steps)))


def _save_model(model: Any, tokenizer: Any, path: Path, meta: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    atomic_write_json(path / "demo.json", meta)


def build_pairs(target: Path, recipe: PairRecipe | None = None, log: Callable[[str], None] = _say,
                tick: Callable[[str, int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train the three models into `target` (student/, teacher/, wide-teacher/, pairs.json); see the module
    docstring. `tick(model, step, total, figures)` reports progress."""
    from minioprd.data import arithmetic_solution
    from minioprd.sft import CEData, train_ce
    from minioprd.builtin.tiny import build_tokenizer

    r = recipe or PairRecipe()
    tok = build_tokenizer()
    tok.padding_side = "left"
    splits = task_splits()
    data = CEData.from_texts(tok, encode_prompts(tok, splits["train"]),
                             [arithmetic_solution(e) for e in splits["train"]])
    val = TaskEval(tok, splits["val"])
    target.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"version": PAIR_VERSION, "recipe": asdict(r), "archs": ARCHS, "key": r.key()}
    tick = tick or (lambda *a: None)

    # 1. shared origin: train until the validation accuracy first reaches student_acc -> the student
    model = new_model("small", tok, r.seed)
    state: dict[str, Any] = {"step": 0, "acc": 0.0, "curve": []}

    def until_student(step: int, loss: float) -> bool:
        state["step"] = step
        if step % r.eval_every:
            return False
        state["acc"] = val(model)["acc"]
        state["curve"].append([step, state["acc"]])
        tick("student", step, r.student_max_steps, {"loss": loss, "val_acc": state["acc"]})
        return state["acc"] >= r.student_acc

    t0 = time.time()
    opt = train_ce(model, data, steps=r.student_max_steps, lr=r.lr, batch_size=r.batch_size, seed=r.seed,
                   pad_id=tok.pad_token_id, callback=until_student)
    s_step = state["step"]
    meta["student"] = {"arch": "small", "steps": s_step, "val_acc": state["acc"], "seconds": time.time() - t0}
    _save_model(model, tok, target / "student", meta["student"])
    tick("student", r.student_max_steps, r.student_max_steps, {"val_acc": state["acc"]})
    log(f"student: {s_step} cross-entropy steps, validation accuracy {state['acc']:.1%}")

    # 2. the same run, teacher_steps further: the shared-origin teacher
    def teacher_tick(step: int, loss: float) -> None:
        if (step - s_step) % r.eval_every == 0:
            tick("teacher", step - s_step, r.teacher_steps, {"loss": loss})

    t0 = time.time()
    train_ce(model, data, steps=r.teacher_steps, lr=r.lr, batch_size=r.batch_size, seed=r.seed,
             pad_id=tok.pad_token_id, start_step=s_step, optimizer=opt, callback=teacher_tick,
             schedule=_decay(s_step, r.teacher_steps))
    acc = val(model)["acc"]
    meta["teacher"] = {"arch": "small", "steps": s_step + r.teacher_steps, "val_acc": acc,
                       "seconds": time.time() - t0}
    _save_model(model, tok, target / "teacher", meta["teacher"])
    log(f"teacher: the same run {r.teacher_steps} steps further, validation accuracy {acc:.1%}")

    # 3. a wider, deeper teacher trained separately from scratch
    wide = new_model("wide", tok, r.seed + 1)

    def wide_tick(step: int, loss: float) -> None:
        if step % r.eval_every == 0:
            tick("wide teacher", step, r.wide_steps, {"loss": loss})

    t0 = time.time()
    train_ce(wide, data, steps=r.wide_steps, lr=r.lr, batch_size=r.batch_size, seed=r.seed + 1,
             pad_id=tok.pad_token_id, callback=wide_tick,
             schedule=lambda step: min(1.0, step / 50) * _decay(0, r.wide_steps)(step))
    acc = val(wide)["acc"]
    meta["wide_teacher"] = {"arch": "wide", "steps": r.wide_steps, "val_acc": acc, "seconds": time.time() - t0}
    _save_model(wide, tok, target / "wide-teacher", meta["wide_teacher"])
    log(f"wide teacher: {r.wide_steps} steps from scratch, validation accuracy {acc:.1%}")
    meta["student_curve"] = state["curve"]
    atomic_write_json(target / "pairs.json", meta)
    return meta


def demo_home() -> Path:
    from minioprd.files import home

    return home() / "demo"


def ensure_pairs(recipe: PairRecipe | None = None, log: Callable[[str], None] = _say,
                 tick: Callable[[str, int, int, dict[str, float]], None] | None = None,
                 rebuild: bool = False) -> Pairs:
    """The cached pairs for `recipe` under `$MINIOPRD_HOME/demo/<key>/`, built (atomically) when missing."""
    r = recipe or PairRecipe()
    target = demo_home() / r.key()
    if rebuild and target.exists():
        shutil.rmtree(target)
    if (target / "pairs.json").is_file():
        return Pairs(target, json.loads((target / "pairs.json").read_text()))
    log(f"building the demo models into {target} (once; later runs load them)")
    build_once(target, lambda tmp: build_pairs(tmp, r, log=log, tick=tick), marker="pairs.json")
    return Pairs(target, json.loads((target / "pairs.json").read_text()))


# --------------------------------------------------------------------------------------------- one run


@dataclass
class RunSpec:
    """One distillation run of the student towards one teacher."""

    pairing: str = "shared"
    method: str = "oprd"  # a METHODS name (sft_teacher = off-policy SFT) or a KNOBS name
    overrides: dict[str, Any] = field(default_factory=dict)
    lr: float = DEMO_LR
    seed: int = 0
    steps: int = 100
    eval_every: int = 10

    def name(self) -> str:
        slug = "".join(c if c.isalnum() or c in "._-+=" else "_" for c in self.method)
        return f"{self.pairing}/{slug}/lr{self.lr:g}-seed{self.seed}-steps{self.steps}"


# newer settings: left out where this version of the package lacks them
OPTIONAL_KEYS = ("eval.keep_best", "loss.projection_init")


def _known_key(key: str) -> bool:
    from minioprd.config import Config

    section, _, name = key.partition(".")
    sub = getattr(Config(), section, None)
    return key not in OPTIONAL_KEYS or (sub is not None and hasattr(sub, name))


def make_config(pairs: Pairs, spec: RunSpec, output_dir: Path, threads: int = 1) -> Any:
    """The distill config of a run."""
    from minioprd.config import load_config

    settings = {**BASE_SETTINGS, **spec.overrides, "model.student": str(pairs.student),
                "model.teacher": str(pairs.teacher(spec.pairing)), "train.lr": spec.lr, "train.seed": spec.seed,
                "train.steps": spec.steps, "train.eval_every": spec.eval_every, "train.threads": threads,
                "train.output_dir": str(output_dir)}
    return load_config(None, {k: v for k, v in settings.items() if _known_key(k)})


def _curve(metrics: Path) -> list[dict[str, float]]:
    rows = []
    for r in read_jsonl(metrics):
        if "eval/acc" in r:
            rows.append({"step": r["step"], **{k[5:]: r[k] for k in r if k.startswith("eval/")}})
    return rows


def run_one(pairs: Pairs, spec: RunSpec, output_dir: Path, evals: dict[str, TaskEval], *, threads: int = 1,
            console: Any = None, on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Distill (or SFT) the cached student towards the pairing's teacher; evaluate on test every
    `eval_every` steps, and on val at the end. Returns the run's result (also written to result.json)."""
    from minioprd.distill import distill, prepare
    from minioprd.layers import layer_map

    cfg = make_config(pairs, spec, output_dir, threads)
    t0, c0 = time.time(), time.process_time()
    picked = spec.method
    say = _say if console is None else (lambda m: console.print(m, markup=False, highlight=False))
    s = prepare(cfg, log=lambda m: None if m.startswith("prompts:") else say(m))
    s.prompts = encode_prompts(s.tokenizer, evals["train_examples"])  # all of train: val/test stay unseen
    say(f"prompts: {len(s.prompts)} (the builtin:arithmetic train split; validation and test are held out)")
    from minioprd.capture import num_layers

    eval_pairs = layer_map("all", num_layers(s.student), num_layers(s.teacher))
    trains_rep = spec.method != "sft_teacher" and (cfg.loss.objective == "oprd" or cfg.loss.mu > 0)
    use_proj = trains_rep and eval_pairs == s.pairs and len(s.projections) > 0

    def evaluator(setup: Any, step: int) -> dict[str, float]:
        figures = evals["test"](setup.student, setup.teacher, eval_pairs, setup.projections if use_proj else None)
        if on_eval is not None:
            on_eval(step, figures)
        return figures

    output_dir.mkdir(parents=True, exist_ok=True)
    if spec.method == "sft_teacher":
        from minioprd.sft import sft_on_teacher

        sft_on_teacher(cfg, s, evaluator)
    else:
        decided = distill(cfg, console=console, force=True, setup=s, evaluator=evaluator)["objective"]
        picked = decided["label"] if decided["requested"] == "auto" else spec.method
    curve = _curve(output_dir / "metrics.jsonl")
    val = evals["val"](s.student)["acc"]
    result = {"pairing": spec.pairing, "method": spec.method, "objective": picked, "lr": spec.lr, "seed": spec.seed,
              "steps": spec.steps, "lora_r": cfg.lora.r, "overrides": spec.overrides, "curve": curve, "final": curve[-1] if curve else {},
              "initial": curve[0] if curve else {}, "val_acc": val, "n_test": len(evals["test"].prompts),
              "eval_every": spec.eval_every, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}
    atomic_write_json(output_dir / "result.json", result)
    return result


def task_evals(tokenizer: Any, n_test: int = 200, n_val: int = 200) -> dict[str, Any]:
    sp = task_splits()
    return {"test": TaskEval(tokenizer, sp["test"][:n_test]), "val": TaskEval(tokenizer, sp["val"][:n_val]),
            "train_examples": sp["train"]}


def _tokenizer(pairs: Pairs) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pairs.student)
    tok.padding_side = "left"
    return tok


def reference_rows(pairs: Pairs, evals: dict[str, Any], pairings: tuple[str, ...]) -> dict[str, Any]:
    """Test accuracy of each teacher and of the student before distillation (KL/cosine to each teacher)."""
    from transformers import AutoModelForCausalLM

    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    from minioprd.capture import num_layers
    from minioprd.layers import layer_map

    student = load(pairs.student)
    out: dict[str, Any] = {}
    for pairing in pairings:
        teacher = load(pairs.teacher(pairing))
        t = evals["test"](teacher)
        s = evals["test"](student, teacher, layer_map("all", num_layers(student), num_layers(teacher)))
        out[pairing] = {"teacher_acc": t["acc"], "student_acc": s["acc"], "student_kl": s["kl"],
                        "student_cos": s.get("cos")}
    return out


def gap_closed(after: float, before: float, teacher: float) -> float | None:
    """(after - before) / (teacher - before); None when the teacher is not better than the student."""
    return (after - before) / (teacher - before) if teacher > before else None


# --------------------------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress display (or nothing without a console)."""

    def __init__(self, console: Any):
        self.p = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[figures]}"), TimeElapsedColumn(), console=console)
            self.p.start()
        self.tasks: dict[str, Any] = {}

    def update(self, name: str, done: int, total: int, figures: str = "") -> None:
        if self.p is None:
            return
        if name not in self.tasks:
            self.tasks[name] = self.p.add_task(name, total=total, figures="")
        self.p.update(self.tasks[name], completed=min(done, total), total=total, figures=figures)

    def print(self, msg: str) -> None:
        if self.p is not None:
            self.p.console.print(msg, markup=False, highlight=False)

    def stop(self) -> None:
        if self.p is not None:
            self.p.stop()


def _pairs_with_progress(recipe: PairRecipe, console: Any, rebuild: bool) -> Pairs:
    prog = _Progress(console)
    try:
        def tick(model: str, step: int, total: int, figures: dict[str, float]) -> None:
            text = " ".join(f"{k} {v:.3g}" for k, v in figures.items())
            prog.update(f"train {model} (cross-entropy)", step, total, text)

        return ensure_pairs(recipe, log=prog.print if console is not None else _say, tick=tick, rebuild=rebuild)
    finally:
        prog.stop()


# --------------------------------------------------------------------------------------------- the demo


def run_demo(output_dir: str | Path = "runs/demo", *, steps: int = 100, lr: float | None = None, lora_r: int = 16,
             pairings: tuple[str, ...] = PAIRINGS, methods: dict[str, str] | None = None, seed: int = 0,
             eval_every: int = 10, n_test: int = 200, recipe: PairRecipe | None = None, threads: int = 1,
             console: Any = None, rebuild: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build or load the pairs, distill the student towards each teacher (`methods[pairing]`, default
    `DEMO_METHODS`: OPRD for the shared-origin teacher, loss.objective=auto for the wide one, where it picks
    opd_full and vanilla OPRD collapses), evaluate teacher, student before and after; write report.json and
    demo.png into `output_dir`. `lr` None = the method's rate picked on the validation split. Returns the report."""
    t_start = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    chosen = {**DEMO_METHODS, **(methods or {})}
    for pairing in pairings:
        if pairing not in PAIRINGS:
            raise MinioprdError(f"unknown pairing {pairing!r}: choose from {', '.join(PAIRINGS)}")
        if chosen[pairing] not in {**METHODS, **DEMO_ONLY} or chosen[pairing] == "sft_teacher":
            raise MinioprdError(f"the demo distills with one of "
                                f"{', '.join(m for m in {**METHODS, **DEMO_ONLY} if m != 'sft_teacher')}"
                                f", got {chosen[pairing]!r}")
    pairs = _pairs_with_progress(recipe or PairRecipe(), console, rebuild)
    tok = _tokenizer(pairs)
    evals = task_evals(tok, n_test=n_test)
    refs = reference_rows(pairs, evals, pairings)
    rows = []
    for pairing in pairings:
        method = chosen[pairing]
        rate = lr if lr is not None else demo_lr(pairing, method, lora_r)
        if console is not None:
            console.rule(f"{method}: student -> "
                         f"{'shared-origin' if pairing == 'shared' else 'wider, deeper'} teacher, lr {rate:g}")
        extra = {**{**METHODS, **DEMO_ONLY}[method], "lora.r": lora_r, **(overrides or {})}
        spec = RunSpec(pairing=pairing, method=method, overrides=extra, lr=rate, seed=seed, steps=steps,
                       eval_every=eval_every)
        res = run_one(pairs, spec, out / pairing, evals, threads=threads, console=console)
        ref = refs[pairing]
        fin = res["final"]
        rows.append({
            "pairing": pairing, "method": method, "objective": res["objective"], "teacher": str(pairs.teacher(pairing)),
            "teacher_acc": ref["teacher_acc"], "student_before_acc": ref["student_acc"],
            "student_after_acc": fin.get("acc"),
            "gap_closed": gap_closed(fin.get("acc", 0.0), ref["student_acc"], ref["teacher_acc"]),
            "kl_before": ref["student_kl"], "kl_after": fin.get("kl"), "cos_before": ref["student_cos"],
            "cos_after": fin.get("cos"), "lr": rate, "lora_r": lora_r, "steps": steps, "seconds": res["seconds"],
            "overrides": extra, "curve": res["curve"], "run_dir": str(out / pairing),
        })
    report = {"version": 1, "task": f"builtin:arithmetic, greedy accuracy on {len(evals['test'].prompts)} test "
              f"problems", "pairs": pairs.meta, "pairs_dir": str(pairs.root), "base_settings": BASE_SETTINGS,
              "rows": rows, "seconds": time.time() - t_start}
    atomic_write_json(out / "report.json", report)
    report["plot"] = str(out / "demo.png") if plot_demo(report, out / "demo.png") else None
    if console is not None:
        print_demo(report, console)
    return report


def plot_demo(report: dict[str, Any], png: Path) -> bool:
    """Accuracy, representation cosine and reverse KL over steps, one line per pairing; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, row in enumerate(report["rows"]):
        color = f"C{i}"
        steps = [c["step"] for c in row["curve"]]
        label = ("shared-origin teacher" if row["pairing"] == "shared" else "wider/deeper teacher") \
            + f", {row.get('method', 'oprd')}"
        axes[0].plot(steps, [c.get("acc", math.nan) for c in row["curve"]], color=color, lw=1.8, label=label)
        axes[0].axhline(row["teacher_acc"], color=color, ls="--", lw=1, alpha=0.7)
        axes[1].plot(steps, [c.get("cos", math.nan) for c in row["curve"]], color=color, lw=1.8, label=label)
        axes[2].plot(steps, [c.get("kl", math.nan) for c in row["curve"]], color=color, lw=1.8, label=label)
    for ax, title in zip(axes, ("test accuracy (dashed: teacher)", "hidden-state cosine to teacher (all layers)",
                                "reverse KL(student||teacher) / token")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("distillation step")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, png, dpi=100)
    return True


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def print_demo(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    arrow = lambda a, b, f=".2f": f"{_num(a, f)}→{_num(b, f)}"  # noqa: E731
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0))
    console.print(f"minioprd demo: {report['task']}", markup=False, highlight=False)
    for col in ("pair", "method", "teacher", "student", "after", "gap", "KL", "cosine"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["rows"]:
        picked = r.get("objective", r["method"])
        table.add_row(r["pairing"], r["method"] + (f" → {picked}" if picked != r["method"] else ""),
                      _pct(r["teacher_acc"]), _pct(r["student_before_acc"]), _pct(r["student_after_acc"]),
                      _num(r["gap_closed"], ".2f"), arrow(r["kl_before"], r["kl_after"]),
                      arrow(r["cos_before"], r["cos_after"]))
    console.print(table)
    console.print("pair: shared = the teacher is the student's own run trained further; wide = a wider, deeper "
                  "teacher trained from scratch. gap = fraction closed, (after - student) / (teacher - student); KL(student "
                  "|| teacher) per token and the hidden-state cosine (all layers), before→after, on the student's "
                  "own greedy answers", markup=False, highlight=False)
    if any(r["pairing"] == "wide" and r["method"] == "oprd" for r in report["rows"]):
        console.print("note: the wide teacher has another origin; vanilla OPRD needs a shared one (paper §6) and "
                      "collapses here - the default (loss.objective=auto) picks opd_full on that pairing", markup=False)
    plot = report.get("plot")
    console.print(f"report: {Path(report['rows'][0]['run_dir']).parent / 'report.json'}"
                  + (f", plot: {plot}" if plot else " (pip install matplotlib for the plot)")
                  + f"; {report['seconds']:.0f} s in all", markup=False, highlight=False)


# --------------------------------------------------------------------------------------------- the comparison


def _mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(results: list[dict[str, Any]], ref: dict[str, Any]) -> dict[str, Any]:
    """Mean ± std over seeds of one (pairing, method) row, from its runs' results."""
    t, b = ref["teacher_acc"], ref["student_acc"]
    finals = [r["final"].get("acc") for r in results]
    gaps = [gap_closed(a, b, t) for a in finals]
    reach = []
    for r in results:
        hit = [c["step"] for c in r["curve"] if c["step"] > 0 and c.get("acc", 0.0) >= 0.9 * t]
        reach.append(hit[0] if hit else None)
    steps = sorted({c["step"] for r in results for c in r["curve"]})
    spread = []
    for st in steps:
        accs = [c["acc"] for r in results for c in r["curve"] if c["step"] == st]
        if len(accs) == len(results) > 1:
            spread.append(statistics.stdev(accs))
    mean_curve = []
    for st in steps:
        accs = [c["acc"] for r in results for c in r["curve"] if c["step"] == st]
        kls = [c.get("kl") for r in results for c in r["curve"] if c["step"] == st]
        mean_curve.append({"step": st, "acc": statistics.fmean(accs), "acc_std": statistics.stdev(accs)
                           if len(accs) > 1 else 0.0, "kl": _mean_std(kls)[0]})
    acc_m, acc_s = _mean_std(finals)
    gap_m, gap_s = _mean_std(gaps)
    kl_m, kl_s = _mean_std([r["final"].get("kl") for r in results])
    cos_m, _ = _mean_std([r["final"].get("cos") for r in results])
    reached = [x for x in reach if x is not None]
    half = []
    for r in results:
        hit = [c["step"] for c in r["curve"] if c["step"] > 0 and c.get("acc", 0.0) >= b + 0.5 * (t - b)]
        half.append(hit[0] if hit else None)
    half_hit = [x for x in half if x is not None]
    return {"seeds": [r["seed"] for r in results], "acc_mean": acc_m, "acc_std": acc_s, "gap_mean": gap_m,
            "gap_std": gap_s, "kl_mean": kl_m, "kl_std": kl_s, "cos_mean": cos_m,
            "steps_to_90": statistics.fmean(reached) if reached else None, "reached_90": len(reached),
            "steps_to_half_gap": statistics.fmean(half_hit) if half_hit else None, "reached_half_gap": len(half_hit),
            "curve_spread": statistics.fmean(spread) if spread else None,
            "best_acc_mean": _mean_std([max(c["acc"] for c in r["curve"]) for r in results])[0],
            "seconds_per_run": statistics.fmean(r["seconds"] for r in results), "mean_curve": mean_curve}


def _run_summary(spec: RunSpec, res: dict[str, Any]) -> dict[str, Any]:
    return {"name": spec.name(), "pairing": spec.pairing, "method": spec.method, "lr": spec.lr, "seed": spec.seed,
            "final": res["final"], "val_acc": res["val_acc"], "seconds": res["seconds"],
            "cpu_seconds": res.get("cpu_seconds")}


def _plan(methods: tuple[str, ...], pairings: tuple[str, ...], knobs: tuple[str, ...]) -> list[tuple[str, str, dict]]:
    rows = []
    for p in pairings:  # the knob rows right after the shared-origin methods whose rates they use
        rows += [(p, m, METHODS[m]) for m in methods if p != "shared" or m not in WIDE_ONLY]
        if p == "shared":
            rows += [("shared", k, KNOBS[k]) for k in knobs]
    return rows


def demo_bridge(pairs: Pairs, pairing: str, out: Path, threads: int = 1) -> Path:
    """`out/bridge-<pairing>`: the OPRD-Bridge of the student and that teacher, fitted once (Stage 0: the
    student's sampled answers to the train split's prompts; Stage 1: teacher PCA, then P_S)."""
    from minioprd.bridge import META, build_bridge

    path = out / f"bridge-{pairing}"
    if not (path / META).is_file():
        build_bridge(str(pairs.teacher(pairing)), str(pairs.student), "builtin:arithmetic", path, rank=BRIDGE_RANK,
                     prompts=2000, max_new_tokens=MAX_NEW_TOKENS, teacher_quant="none", device="cpu",
                     chat_template="true", prompt_suffix="", threads=threads, force=True)
    return path


def run_compare(output_dir: str | Path = "runs/demo-compare", *, seeds: int = 3, steps: int = 100,
                methods: tuple[str, ...] = tuple(METHODS), pairings: tuple[str, ...] = PAIRINGS,
                knobs: tuple[str, ...] = tuple(KNOBS), lrs: tuple[float, ...] = LORA_LRS,
                full_lrs: tuple[float, ...] = FULL_LRS, eval_every: int = 10, n_test: int = 200,
                recipe: PairRecipe | None = None, threads: int = 1, console: Any = None,
                rebuild: bool = False) -> dict[str, Any]:
    """Every method (and knob row) on the same pairs, steps and rollout budget; per row the learning rate is
    picked from the same grid on the validation split with seed 0, then seeds 1.. run at that rate. Finished
    runs are reused from `output_dir/runs/` (an interrupted comparison resumes). Writes compare.json,
    compare.md and compare.png; returns the comparison."""
    unknown = [m for m in methods if m not in METHODS] + [k for k in knobs if k not in KNOBS]
    if unknown:
        raise MinioprdError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)} "
                            f"(knob rows: {', '.join(KNOBS)})")
    for p in pairings:
        if p not in PAIRINGS:
            raise MinioprdError(f"unknown pairing {p!r}: choose from {', '.join(PAIRINGS)}")
    if seeds < 1 or steps < 1 or not lrs:
        raise MinioprdError("seeds and steps must be >= 1 and the learning-rate grid must not be empty")
    t_start = time.time()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    pairs = _pairs_with_progress(recipe or PairRecipe(), console, rebuild)
    tok = _tokenizer(pairs)
    evals = task_evals(tok, n_test=n_test)
    refs = reference_rows(pairs, evals, pairings)
    plan = _plan(methods, pairings, knobs)

    def grid_of(over: dict[str, Any], method: str) -> tuple[float, ...] | None:
        if over.get("lora.r") == 0:
            return full_lrs
        if method in KNOBS:
            return None  # at OPRD's rate: the knob changes the loss, not its optimisation
        return lrs

    total = sum(len(grid_of(o, m) or ()) + seeds - (1 if grid_of(o, m) else 0) for _, m, o in plan)
    prog = _Progress(console)
    done = 0
    runs: list[dict[str, Any]] = []

    def one(pairing: str, method: str, over: dict[str, Any], lr: float, seed: int) -> dict[str, Any]:
        nonlocal done
        if "{bridge}" in over.values():
            over = {k: str(demo_bridge(pairs, pairing, out, threads)) if v == "{bridge}" else v
                    for k, v in over.items()}
        spec = RunSpec(pairing=pairing, method=method, overrides=over, lr=lr, seed=seed, steps=steps,
                       eval_every=eval_every)
        run_dir = out / "runs" / spec.name()
        cached = run_dir / "result.json"
        label = f"{pairing} {method} lr={lr:g} seed={seed}"
        if cached.is_file():
            res = json.loads(cached.read_text())
            if res.get("overrides") == json.loads(json.dumps(over)) and res.get("n_test") == n_test \
                    and res.get("eval_every") == eval_every and res.get("curve") \
                    and res["curve"][0].get("step") == 0 and res["curve"][-1].get("step") == steps:
                done += 1
                prog.update("all runs", done, total)
                runs.append(_run_summary(spec, res))
                return res
        prog.update("current run", 0, steps, label)
        res = run_one(pairs, spec, run_dir, evals, threads=threads,
                      on_eval=lambda step, f: prog.update("current run", step, steps,
                                                          f"{label}  acc {f['acc']:.2f} kl {f.get('kl', 0):.2f}"))
        done += 1
        prog.update("all runs", done, total, f"last: {label} -> test acc {res['final'].get('acc', 0):.3f}, "
                                             f"val acc {res['val_acc']:.3f}")
        prog.print(f"{label}: test acc {res['final'].get('acc', 0):.3f} (val {res['val_acc']:.3f}), "
                   f"kl {res['final'].get('kl', 0):.3f}, {res['seconds']:.0f} s")
        runs.append(_run_summary(spec, res))
        return res

    rows: list[dict[str, Any]] = []
    chosen: dict[tuple[str, str], float] = {}
    try:
        prog.update("all runs", 0, total)
        for pairing, method, over in plan:
            grid = grid_of(over, method)
            grid_val: dict[str, float] = {}
            if grid:
                results_by_lr = {lr: one(pairing, method, over, lr, 0) for lr in grid}
                grid_val = {f"{lr:g}": r["val_acc"] for lr, r in results_by_lr.items()}
                best = max(grid, key=lambda lr: (results_by_lr[lr]["val_acc"], -lr))  # ties: the smaller rate
                seed_results = [results_by_lr[best]]
            else:
                best = chosen.get((pairing, KNOB_LR_FROM.get(method, "oprd")), DEMO_LR)
                seed_results = [one(pairing, method, over, best, 0)]
            chosen[(pairing, method)] = best
            seed_results += [one(pairing, method, over, best, s) for s in range(1, seeds)]
            row = {"pairing": pairing, "method": method, "knob": method in KNOBS, "overrides": over, "lr": best,
                   "lr_grid_val_acc": grid_val, **aggregate(seed_results, refs[pairing])}
            rows.append(row)
    finally:
        prog.stop()
    result = {"version": 1, "command_settings": {"seeds": seeds, "steps": steps, "methods": list(methods),
                                                 "pairings": list(pairings), "knobs": list(knobs), "lrs": list(lrs),
                                                 "full_lrs": list(full_lrs), "eval_every": eval_every,
                                                 "n_test": n_test, "threads": threads},
              "base_settings": BASE_SETTINGS, "pairs": pairs.meta, "reference": refs, "rows": rows,
              "runs": runs, "seconds": time.time() - t_start}
    atomic_write_json(out / "compare.json", result)
    md = compare_markdown(result)
    atomic_write_text(out / "compare.md", md)
    result["plot"] = str(out / "compare.png") if plot_compare(result, out / "compare.png") else None
    if console is not None:
        from rich.markdown import Markdown

        console.print(Markdown(md))
        console.print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}"
                      + (f", {result['plot']}" if result["plot"] else "")
                      + f" in {result['seconds'] / 60:.1f} min", markup=False, highlight=False)
    return result


def _pm(m: float | None, s: float | None, pct: bool = True, digits: int = 1) -> str:
    if m is None:
        return "-"
    k = 100 if pct else 1
    return f"{k * m:.{digits}f} ± {k * (s or 0):.{digits}f}"


def _reach(step: float | None, hits: int, n: int) -> str:
    return f"never (0/{n})" if step is None else f"{step:.0f} ({hits}/{n})"


def compare_markdown(result: dict[str, Any]) -> str:
    """The comparison as markdown: one table per pairing (methods, then knob rows), plus the lr grid."""
    cs = result["command_settings"]
    lines = [f"Task: builtin:arithmetic, greedy accuracy on {cs['n_test']} test problems. {cs['steps']} steps x 16 "
             f"prompts x 4 rollouts (T=1) per run, LoRA r=16 unless noted, {cs['seeds']} seed(s) per row; the "
             f"learning rate of each row is picked on a 200-problem validation split (seed 0) from the same grid "
             f"({', '.join(f'{x:g}' for x in cs['lrs'])}; full fine-tuning: "
             f"{', '.join(f'{x:g}' for x in cs['full_lrs'])}); knob rows use OPRD's rate. "
             f"Mean ± std over seeds of the final test accuracy, the fraction of the gap closed ((after - before) / "
             f"(teacher - before)) and the reverse KL(student || teacher) per token on the student's own greedy "
             f"answers; steps to ½ gap / 90% of teacher: first evaluation (every {cs['eval_every']} steps) that "
             f"reaches it, mean over the seeds that did (how many in brackets); seed spread: std of the accuracy "
             f"curves across seeds, averaged over evaluations.", ""]
    for pairing, ref in result["reference"].items():
        title = "shared-origin teacher (a further-trained copy of the student)" if pairing == "shared" \
            else "wider/deeper teacher trained from scratch (projections)"
        lines += [f"### {title}", "",
                  f"Teacher {100 * ref['teacher_acc']:.1f}%, student before {100 * ref['student_acc']:.1f}% "
                  f"(reverse KL {ref['student_kl']:.3f} nats/token"
                  + (f", cosine {ref['student_cos']:.3f}" if ref.get("student_cos") is not None else "") + ").", "",
                  "| method | lr | test acc % | gap closed | steps to ½ gap | steps to 90% of teacher | final KL | "
                  "cosine | seed spread (pp) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in [r for r in result["rows"] if r["pairing"] == pairing]:
            name = f"*{r['method']}*" if r["knob"] else f"**{r['method']}**"
            n = len(r["seeds"])
            lines.append(f"| {name} | {r['lr']:g} | {_pm(r['acc_mean'], r['acc_std'])} | "
                         f"{_pm(r['gap_mean'], r['gap_std'], pct=False, digits=2)} | "
                         f"{_reach(r.get('steps_to_half_gap'), r.get('reached_half_gap', 0), n)} | "
                         f"{_reach(r['steps_to_90'], r['reached_90'], n)} | "
                         f"{_pm(r['kl_mean'], r['kl_std'], pct=False, digits=3)} | "
                         f"{_num(r['cos_mean'])} | {_num(r['curve_spread'] and 100 * r['curve_spread'], '.1f')} |")
        lines.append("")
    grid_rows = [r for r in result["rows"] if r["lr_grid_val_acc"]]
    if grid_rows:
        cols = sorted({k for r in grid_rows for k in r["lr_grid_val_acc"]}, key=float)
        lines += ["Validation accuracy % (seed 0) over the learning-rate grid (* = picked):", "",
                  "| pairing | method | " + " | ".join(f"lr {k}" for k in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for r in grid_rows:
            vals = r["lr_grid_val_acc"]
            lines.append(f"| {r['pairing']} | {r['method']} | " + " | ".join(
                "" if k not in vals else f"{100 * vals[k]:.1f}" + (" *" if float(k) == r["lr"] else "")
                for k in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_compare(result: dict[str, Any], png: Path) -> bool:
    """Mean ± std test-accuracy curves per method, one panel per pairing; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    pairings = list(result["reference"])
    fig, axes = plt.subplots(1, len(pairings), figsize=(6.5 * len(pairings), 4.2), squeeze=False)
    for ax, pairing in zip(axes[0], pairings):
        ref = result["reference"][pairing]
        for i, r in enumerate([r for r in result["rows"] if r["pairing"] == pairing and not r["knob"]]):
            c = r["mean_curve"]
            x = [p["step"] for p in c]
            m = [p["acc"] for p in c]
            s = [p["acc_std"] for p in c]
            ax.plot(x, m, color=f"C{i}", lw=1.6, label=f"{r['method']} (lr {r['lr']:g})")
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=f"C{i}",
                            alpha=0.15)
        ax.axhline(ref["teacher_acc"], color="k", ls="--", lw=1, label="teacher")
        ax.axhline(ref["student_acc"], color="grey", ls=":", lw=1, label="student before")
        ax.set_title("shared-origin teacher" if pairing == "shared" else "wider/deeper teacher", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, png, dpi=100)
    return True
