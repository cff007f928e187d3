"""`minioprd plan`: will it fit? The estimate (estimate.py) for a config, with `loss.objective=auto` planned as
the objective it is expected to pick and, on a card with `train.fit=auto`, the memory settings `fit.py` picks
there; rollout sizes that fit; the table.

    minioprd plan --teacher Qwen2.5-7B --student Qwen2.5-0.5B --gpu t4
    from minioprd.plan import plan; p = plan(load_config("recipes/x.yaml"), gpu="t4"); p.fits, p.peak_gib()
"""

from __future__ import annotations

from typing import Any

from minioprd.catalog import ModelShape, model_shape
from minioprd.config import Config
from minioprd.estimate import (ALLOCATOR_SLACK, GIB, Plan, _plan_for, _proposals, _resolve,
                               objective_for_plan)


def plan(cfg: Config, gpu: str | None = None, vram_gb: float | None = None, prompt_tokens: int | None = None,
         propose: bool = True, teacher: ModelShape | None = None, student: ModelShape | None = None,
         fit: bool = True) -> Plan:
    """Estimate the peak memory of `distill(cfg)`; see the module docstring for the terms.

    gpu: a key of GPUS (t4, l4, a10, 3060, 3090, 4090, a100-40, a100-80, ...); vram_gb: a card size in GiB
    (overrides the size of `gpu`). Neither: a CUDA estimate with no verdict, or a CPU (RAM) estimate when
    model.device is cpu. prompt_tokens: the longest prompt in a batch (default data.max_prompt_tokens).
    loss.objective=auto is planned as `objective_for_plan` says. fit: with a card and train.fit=auto, plan the
    settings `distill` would pick for it (`fit.fit_settings`; `Plan.fit` says what changed).
    """
    t = teacher or model_shape(cfg.model.teacher)
    s = student or model_shape(cfg.model.student)
    where = _resolve(cfg, gpu, vram_gb)
    cfg, objective, reason = objective_for_plan(cfg, t, s, where, prompt_tokens)
    chosen = None
    if fit and cfg.train.fit == "auto" and where[0] == "cuda" and where[1] is not None:
        from minioprd.fit import fit_settings  # the settings distill's train.fit=auto picks for this card

        chosen = fit_settings(cfg, t, s, where, prompt_tokens)
        cfg = chosen.cfg
    p = _plan_for(cfg, t, s, where, prompt_tokens)
    p.objective, p.objective_reason, p.fit = objective, reason, chosen
    if propose and p.gpu is not None:
        p.proposals = _proposals(cfg, p, prompt_tokens)
    return p


def render(p: Plan, console: Any) -> None:
    """The plan as a rich table, a verdict and the proposals."""
    from rich.table import Table

    second = " + CPU RAM (teacher)" if p.teacher_on_cpu else " x2 (teacher on the second card)"
    title = f"minioprd plan: {p.teacher.name} -> {p.student.name} on " + (
        (p.gpu.name + (second if p.cards == 2 else "")) if p.gpu else ("CPU (RAM)" if p.device == "cpu" else "CUDA"))
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("term")
    table.add_column("phase")
    if p.cards == 2:
        table.add_column("card")
    table.add_column("GiB", justify="right")
    table.add_column("how", overflow="fold", max_width=70)
    for t in p.terms:
        row = [t.name, t.phase] + ([p.card_name(t.card)] if p.cards == 2 else []) + [f"{t.gib:.2f}", t.detail]
        table.add_row(*row, style="dim" if t.phase == "info" else None)
    console.print(table)
    for c in range(p.cards):
        which = f" {p.card_name(c)}" if p.cards == 2 else ""
        ph = ", ".join(f"{k} +{v / GIB:.2f}" for k, v in p.phases[c].items())
        console.print(f"peak{which}: [bold]{p.peak_gib(c):.2f} GiB[/bold] = static + max({ph})"
                      + (f" + {ALLOCATOR_SLACK:.0%} allocator slack" if p.on_gpu(c) else ""), highlight=False)
    console.print(f"shapes: B={p.batch} (prompts x n), micro-batch {p.micro_batch}, P={p.prompt_tokens} prompt + "
                  f"R={p.new_tokens} new tokens, {len(p.pairs)} mapped layers, {p.dtype}", highlight=False)
    if p.objective_reason:
        console.print(f"objective: {p.objective} ({p.objective_reason})", highlight=False, markup=False)
    if p.fit is not None:
        console.print(p.fit.summary() if p.fit.fits else f"train.fit=auto: {p.fit.summary()} (distill stops "
                      f"here, before loading any weights)", highlight=False, markup=False)
    style = "green" if p.fits else ("red" if p.fits is False else "yellow")
    console.print(f"[{style}]{p.verdict()}[/{style}]", highlight=False)
    for pr in p.proposals:
        console.print(f"  {pr.why}: {pr.overrides}  (~{pr.peak_gib:.1f} GiB)", highlight=False, markup=False)
    for n in p.notes:
        console.print(f"note: {n}", highlight=False, markup=False)


def plan_processes(cfg: Config, processes: int, **kw: Any) -> tuple[Plan, dict[str, Any]]:
    """`plan --num-processes N`: the plan of one of N data-parallel processes (parallel.py), which holds its own
    teacher and student on its own card and rolls out its share of the step's prompts, and what N processes
    can gain. Every card holds the same, so the per-process plan is the per-GPU memory.

    The gain bound: a step takes as long as the process with the most prompts; the teacher forward and the
    update are compute-bound and shrink with the rows, decoding a small batch is bound by reading the
    student's weights once per token whatever the rows, so the rollout share gains less than the bound."""
    import copy
    import math

    from minioprd.errors import MinioprdError

    k = cfg.rollout.prompts_per_step
    if processes > k:
        raise MinioprdError(f"{processes} processes cannot share rollout.prompts_per_step={k} prompts (each needs "
                            f"at least one): use at most {k} processes or raise rollout.prompts_per_step")
    one = copy.deepcopy(cfg)
    one.rollout.prompts_per_step = math.ceil(k / processes)
    one.model.teacher_device = "same"
    if one.model.device.startswith("cuda:"):
        one.model.device = "cuda"
    p = plan(one, **kw)
    p.notes.append(f"the table and proposals are one process's (rollout.prompts_per_step={one.rollout.prompts_per_step}"
                   f"); the run's rollout.prompts_per_step is the global batch, {processes} times that")
    info = {"processes": processes, "prompts_per_process": one.rollout.prompts_per_step,
            "per_gpu_gib": round(p.peak_gib(), 3), "throughput_gain_max": round(k / one.rollout.prompts_per_step, 3)}
    return p, info


def render_processes(p: Plan, info: dict[str, Any], console: Any) -> None:
    """`plan_processes`' closing line: memory per GPU and the throughput bound."""
    n, share = info["processes"], info["prompts_per_process"]
    where = p.gpu.name if p.gpu else ("CPU" if p.device == "cpu" else "each card")
    console.print(f"{n} processes (data-parallel, one {'CPU process' if p.device == 'cpu' else 'card'} each): "
                  f"{info['per_gpu_gib']:.2f} GiB per {'process' if p.device == 'cpu' else 'GPU'} on {where} "
                  f"(its own teacher and student, {share} of the step's prompts); expected throughput gain up to "
                  f"{info['throughput_gain_max']:.2f}x prompts/s over one process: the teacher forward and the "
                  f"update split {n} ways, the rollout gains less (decoding a small batch reads the student's "
                  f"weights once per token whatever the rows); measure with `minioprd bench step "
                  f"--num-processes {n}`", highlight=False, markup=False)
