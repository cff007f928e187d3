"""`minioprd demo --compare`: a small-scale reproduction of the paper's comparison (OPRD vs output-space OPD,
paper Table 2): every objective (runs.METHODS, with OPRD-Bridge rows on the wide pairing: `demo_bridge` fits the
bridge once) and the OPRD knobs (runs.KNOBS) with 3 seeds, each at the learning rate it does best with on the
validation split (same grid for all); it resumes from its finished runs.

    table = run_compare("runs/compare", seeds=3)   # -> compare.json, compare.md, compare.png
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from minioprd.demo.pairs import PAIRINGS, PairRecipe, Pairs, load_tokenizer
from minioprd.demo.runs import (BASE_SETTINGS, BRIDGE_RANK, DEMO_LR, FULL_LRS, KNOB_LR_FROM, KNOBS, LORA_LRS, METHODS,
                                WIDE_ONLY, DemoProgress, RunSpec, fmt_num, pairs_with_progress, reference_rows, run_one)
from minioprd.demo.task import MAX_NEW_TOKENS, gap_closed, test_sets
from minioprd.errors import MinioprdError
from minioprd.files import atomic_write_json, atomic_write_text
from minioprd.report import save_png


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
    pairs = pairs_with_progress(recipe or PairRecipe(), console, rebuild)
    tok = load_tokenizer(pairs)
    evals = test_sets(tok, n_test=n_test)
    refs = reference_rows(pairs, evals, pairings)
    plan = _plan(methods, pairings, knobs)

    def grid_of(over: dict[str, Any], method: str) -> tuple[float, ...] | None:
        if over.get("lora.r") == 0:
            return full_lrs
        if method in KNOBS:
            return None  # at OPRD's rate: the knob changes the loss, not its optimisation
        return lrs

    total = sum(len(grid_of(o, m) or ()) + seeds - (1 if grid_of(o, m) else 0) for _, m, o in plan)
    prog = DemoProgress(console)
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
                         f"{fmt_num(r['cos_mean'])} | "
                         f"{fmt_num(r['curve_spread'] and 100 * r['curve_spread'], '.1f')} |")
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
