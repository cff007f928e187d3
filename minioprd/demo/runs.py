"""`minioprd demo`: OPRD working end to end on a laptop CPU in minutes, on the task of `task.py` and the model
pairs of `pairs.py`: the student distilled with OPRD towards the shared-origin teacher (LoRA r=16, lr 1e-2, 100
steps of 16 prompts x 4 rollouts at T=1) and with the package default, loss.objective=auto, towards the wide
one, where it picks opd_full: vanilla OPRD collapses there (the paper's stated limitation: it needs aligned
representations). One run (`run_one`) is also the
unit of `minioprd demo --compare` (compare.py).

    report = run_demo("runs/demo")  # -> report.json, demo.png

Accuracy is greedy on the 200 test problems; reverse KL(student || teacher) per token and the hidden-state
cosine (all layers, proportional map) are measured on the evaluated student's own greedy responses
(`task.TestSet`). Learning rates were picked on a separate 200-problem validation split, never on test.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from minioprd.demo.pairs import PAIRINGS, PairRecipe, Pairs, ensure_pairs, load_tokenizer
from minioprd.demo.task import MAX_NEW_TOKENS, encode_prompts, gap_closed, test_sets
from minioprd.errors import MinioprdError
from minioprd.files import atomic_write_json, read_jsonl
from minioprd.report import save_png

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


def run_one(pairs: Pairs, spec: RunSpec, output_dir: Path, evals: dict[str, Any], *, threads: int = 1,
            console: Any = None, on_eval: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Distill (or SFT) the cached student towards the pairing's teacher; evaluate on test every
    `eval_every` steps, and on val at the end. Returns the run's result (also written to result.json)."""
    from minioprd.distill import distill, prepare
    from minioprd.layers import layer_map

    cfg = make_config(pairs, spec, output_dir, threads)
    t0, c0 = time.time(), time.process_time()
    picked = spec.method
    say = (lambda m: None) if console is None else (lambda m: console.print(m, markup=False, highlight=False))
    s = prepare(cfg, log=lambda m: None if m.startswith("prompts:") else say(m))
    s.prompts = encode_prompts(s.tokenizer, evals["train_examples"])  # all of train: val/test stay unseen
    say(f"prompts: {len(s.prompts)} (the builtin:arithmetic train split; validation and test are held out)")
    from minioprd.capture import num_layers

    eval_pairs = layer_map("all", num_layers(s.student), num_layers(s.teacher))
    trains_rep = spec.method != "sft_teacher" and cfg.loss.has_representation_term()
    use_proj = trains_rep and eval_pairs == s.pairs and len(s.projections) > 0

    def evaluator(setup: Any, step: int) -> dict[str, float]:
        figures = evals["test"](setup.student, setup.teacher, eval_pairs, setup.projections if use_proj else None)
        if on_eval is not None:
            on_eval(step, figures)
        return figures

    output_dir.mkdir(parents=True, exist_ok=True)
    if spec.method == "sft_teacher":
        from minioprd.demo.sft import sft_on_teacher

        sft_on_teacher(cfg, s, evaluator)
    else:
        decided = distill(cfg, console=console, force=True, setup=s, evaluator=evaluator)["objective"]
        picked = decided["label"] if decided["requested"] == "auto" else spec.method
    curve = _curve(output_dir / "metrics.jsonl")
    val = evals["val"](s.student)["acc"]
    result = {"pairing": spec.pairing, "method": spec.method, "objective": picked, "lr": spec.lr, "seed": spec.seed,
              "steps": spec.steps, "lora_r": cfg.lora.r, "overrides": spec.overrides, "curve": curve,
              "final": curve[-1] if curve else {}, "initial": curve[0] if curve else {}, "val_acc": val,
              "n_test": len(evals["test"].prompts), "eval_every": spec.eval_every, "seconds": time.time() - t0,
              "cpu_seconds": time.process_time() - c0}
    atomic_write_json(output_dir / "result.json", result)
    return result


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


class DemoProgress:
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


def pairs_with_progress(recipe: PairRecipe, console: Any, rebuild: bool) -> Pairs:
    prog = DemoProgress(console)
    try:
        def tick(model: str, step: int, total: int, figures: dict[str, float]) -> None:
            text = " ".join(f"{k} {v:.3g}" for k, v in figures.items())
            prog.update(f"train {model} (cross-entropy)", step, total, text)

        return ensure_pairs(recipe, log=prog.print, tick=tick, rebuild=rebuild)
    finally:
        prog.stop()


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
    pairs = pairs_with_progress(recipe or PairRecipe(), console, rebuild)
    tok = load_tokenizer(pairs)
    evals = test_sets(tok, n_test=n_test)
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


def fmt_num(v: Any, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def print_demo(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    arrow = lambda a, b, f=".2f": f"{fmt_num(a, f)}→{fmt_num(b, f)}"  # noqa: E731
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0))
    console.print(f"minioprd demo: {report['task']}", markup=False, highlight=False)
    for col in ("pair", "method", "teacher", "student", "after", "gap", "KL", "cosine"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in report["rows"]:
        picked = r.get("objective", r["method"])
        table.add_row(r["pairing"], r["method"] + (f" → {picked}" if picked != r["method"] else ""),
                      _pct(r["teacher_acc"]), _pct(r["student_before_acc"]), _pct(r["student_after_acc"]),
                      fmt_num(r["gap_closed"], ".2f"), arrow(r["kl_before"], r["kl_after"]),
                      arrow(r["cos_before"], r["cos_after"]))
    console.print(table)
    console.print("pair: shared = the teacher is the student's own run trained further; wide = a wider, deeper "
                  "teacher trained from scratch. gap = fraction closed, (after - student) / (teacher - student); "
                  "KL(student || teacher) per token and the hidden-state cosine (all layers), before→after, on the "
                  "student's own greedy answers", markup=False, highlight=False)
    if any(r["pairing"] == "wide" and r["method"] == "oprd" for r in report["rows"]):
        console.print("note: the wide teacher has another origin; vanilla OPRD needs a shared one (paper §6) and "
                      "collapses here - the default (loss.objective=auto) picks opd_full on that pairing", markup=False)
    plot = report.get("plot")
    console.print(f"report: {Path(report['rows'][0]['run_dir']).parent / 'report.json'}"
                  + (f", plot: {plot}" if plot else " (pip install matplotlib for the plot)")
                  + f"; {report['seconds']:.0f} s in all", markup=False, highlight=False)
