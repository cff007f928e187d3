"""`train.fit=auto`: the memory settings the user left alone, chosen for the card before any weights load.

A run's memory is decided by three settings that change speed, never the result: `lora.gradient_checkpointing`
(recompute the student's forward in backward), `rollout.micro_batch` (sequences per update forward, gradients
accumulated) and `loss.opd_chunk` (rows of logits alive at once in the output-space losses). Their plain
defaults are the fastest and assume a large card: Qwen2.5-7B -> 0.5B needs ~22 GiB with them. On CUDA,
`fit_to_card` asks the planner (`estimate.py`) for the fastest settings whose estimate fits the card's free
memory, changes only the settings no recipe, flag or override set, prints them with the estimate, and stops
with one line and a rollout size that fits when even the leanest settings do not. On a CPU it does nothing.

    from minioprd.fit import fit_settings; f = fit_settings(cfg, teacher_shape, student_shape, where)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from minioprd.config import Config, is_explicit
from minioprd.errors import MinioprdError
from minioprd.catalog import GPU, ModelShape, model_shape
from minioprd.estimate import (CUDA_CONTEXT, GIB, MIB, Plan, Proposal, Where, _plan_for, _proposals, _resolve,
                               objective_for_plan)

FIT_KEYS = ("lora.gradient_checkpointing", "rollout.micro_batch", "loss.opd_chunk")
# The estimate is an upper bound (every prompt at max_prompt_tokens, every response at full length), but the
# planner's own verdict calls more than 90% of a card "tight": the fastest settings under 90% win, and only
# when none is under 90% the fastest under 100%.
HEADROOM = 0.90
OPD_CHUNKS = (512, 256, 128)  # below 128 rows the (chunk, V) matmuls stop paying for the loop


@dataclass
class Fit:
    """What train.fit=auto chose for one card."""

    cfg: Config  # the config with the chosen settings (objective resolved as the plan has it)
    card: GPU
    chosen: dict[str, Any]  # every fit key -> the value the run uses
    changed: dict[str, Any]  # the keys whose value train.fit changed
    kept: list[str]  # fit keys the user set, left as they are
    peak: float  # bytes, estimated with the chosen settings
    given_peak: float  # bytes, estimated with the settings as given
    fits: bool
    proposal: Proposal | None = None  # nothing fits: the largest rollout that fits at the leanest settings
    notes: list[str] = field(default_factory=list)  # the plan's notes when nothing fits (e.g. teacher too big)

    def overrides(self, which: dict[str, Any]) -> str:
        return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in which.items())

    def summary(self) -> str:
        """One line: what was chosen and why, or why nothing fits."""
        lim = self.card.mib * MIB
        where = f"{self.card.name}"
        kept = f"; kept as you set them: {', '.join(self.kept)}" if self.kept else ""
        if not self.fits:
            what = (f"try {self.proposal.overrides} (~{self.proposal.peak_gib:.1f} GiB)" if self.proposal else
                    (self.notes[0] if self.notes else "use a smaller teacher or student"))  # notes: never empty
            return (f"does not fit {where}: even with {self.overrides(self.chosen)} the estimated peak is "
                    f"{self.peak / GIB:.1f} GiB of {lim / GIB:.1f} GiB; {what}, or train.fit=off to run anyway")
        if not self.changed:
            return (f"train.fit=auto for {where}: the settings as given fit (estimated peak "
                    f"{self.peak / GIB:.1f} GiB of {lim / GIB:.1f} GiB, {self.peak / lim:.0%}){kept}")
        return (f"train.fit=auto for {where}: {self.overrides(self.changed)} (estimated peak {self.peak / GIB:.1f} "
                f"GiB of {lim / GIB:.1f} GiB, {self.peak / lim:.0%}; as given {self.given_peak / GIB:.1f} GiB){kept}; "
                f"a value you set wins, train.fit=off keeps the defaults")

    def to_dict(self) -> dict[str, Any]:
        return {"card": self.card.name, "card_gib": round(self.card.mib / 1024, 2), "fits": self.fits,
                "chosen": self.chosen, "changed": self.changed, "kept": self.kept,
                "peak_gib": round(self.peak / GIB, 3), "given_peak_gib": round(self.given_peak / GIB, 3),
                "proposal": self.proposal.overrides if self.proposal else None, "summary": self.summary()}


def _micro_batches(batch: int) -> list[int]:
    """B, then halvings down to 1 (B=8: 8, 4, 2, 1)."""
    out, m = [batch], batch
    while m > 1:
        m = (m + 1) // 2
        out.append(m)
    return out


def ladder(cfg: Config) -> list[dict[str, Any]]:
    """Candidate settings, fastest first; a key the user set keeps its value in every candidate.

    Smaller OPD chunks first (the same work in more pieces), then smaller micro-batches (the same work,
    fewer sequences per forward), and gradient checkpointing last (it recomputes the student's forward).
    """
    B = cfg.rollout.prompts_per_step * cfg.rollout.n
    gcs = [cfg.lora.gradient_checkpointing] if is_explicit(cfg, "lora.gradient_checkpointing") else [False, True]
    mbs = [cfg.rollout.micro_batch] if is_explicit(cfg, "rollout.micro_batch") else \
        [0] + [m for m in _micro_batches(B)[1:]]  # 0 (= all B at once) is the default spelling of B
    opd = cfg.loss.objective != "oprd"
    chunks = [cfg.loss.opd_chunk] if is_explicit(cfg, "loss.opd_chunk") or not opd else list(OPD_CHUNKS)
    out: list[dict[str, Any]] = []
    for gc in gcs:
        for mb in mbs:
            for chunk in chunks:
                cand = {"lora.gradient_checkpointing": gc, "rollout.micro_batch": mb, "loss.opd_chunk": chunk}
                if cand not in out:
                    out.append(cand)
    return out


def _with(cfg: Config, settings: dict[str, Any]) -> Config:
    c = copy.deepcopy(cfg)
    for key, value in settings.items():
        section, _, name = key.partition(".")
        setattr(getattr(c, section), name, value)
    return c


def _peak(p: Plan) -> float:
    return max(p.peak(k) for k in range(p.cards) if p.on_gpu(k))


def fit_settings(cfg: Config, teacher: ModelShape, student: ModelShape, where: Where,
                 prompt_tokens: int | None = None) -> Fit:
    """The fastest candidate of `ladder(cfg)` whose estimate fits `where`'s card (see HEADROOM).

    `cfg` must have a concrete objective (`plan.objective_for_plan`). Nothing fits: `fits` is False, `cfg` holds
    the leanest candidate and `proposal` the largest rollout (prompts x tokens) that fits with it.
    """
    card = where[1]
    lim = card.mib * MIB
    given = _peak(_plan_for(cfg, teacher, student, where, prompt_tokens))
    tried = [(c, _plan_for(_with(cfg, c), teacher, student, where, prompt_tokens)) for c in ladder(cfg)]
    pick = next((c for c, p in tried if _peak(p) <= HEADROOM * lim), None) or \
        next((c for c, p in tried if _peak(p) <= lim), None)
    fits = pick is not None
    if pick is None:
        pick = min(tried, key=lambda cp: _peak(cp[1]))[0]
    if cfg.loss.objective == "oprd":  # no logits: the chunk plays no part
        pick = {k: v for k, v in pick.items() if k != "loss.opd_chunk"}
    chosen_cfg = _with(cfg, pick)
    chosen_plan = next(p for c, p in tried if {k: c[k] for k in pick} == pick)
    current = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in FIT_KEYS}
    changed = {k: v for k, v in pick.items() if current[k] != v}
    kept = [k for k in FIT_KEYS if is_explicit(cfg, k) and (k != "loss.opd_chunk" or cfg.loss.objective != "oprd")]
    out = Fit(chosen_cfg, card, pick, changed, kept, _peak(chosen_plan), given, fits)
    if not fits:
        props = _proposals(chosen_cfg, chosen_plan, prompt_tokens)
        out.proposal = next((p for p in props if "rollout.max_new_tokens" in p.settings
                             and "rollout.prompts_per_step" in p.settings), props[0] if props else None)
        static = sum(t.bytes for t in chosen_plan.terms if t.phase == "static" and t.card == 0)
        out.notes = chosen_plan.notes + [f"the weights, optimizer state and CUDA context alone take "
                                         f"{static / GIB:.1f} GiB: use a smaller teacher or student, or a shorter "
                                         f"data.max_prompt_tokens"]
    return out


def detect_card(cfg: Config) -> GPU | None:
    """The card the run will use, sized by its free memory (the smaller one when the teacher has its own);
    None on a CPU run. The planner counts the CUDA context as a term, so it is added back to the free memory
    (torch.cuda.mem_get_info creates this process's context before it answers)."""
    import torch

    if cfg.model.device == "cpu" or not torch.cuda.is_available():
        return None
    devices = [cfg.model.device if cfg.model.device.startswith("cuda:") else "cuda"]
    if cfg.model.teacher_device.startswith("cuda"):
        devices.append(cfg.model.teacher_device)
    try:
        found = [(torch.cuda.mem_get_info(torch.device(d)), d) for d in devices]
        (free, _total), dev = min(found, key=lambda f: f[0][0])
        name, bf16 = torch.cuda.get_device_name(torch.device(dev)), torch.cuda.is_bf16_supported()
    except (RuntimeError, AssertionError, ValueError):  # a device that does not exist: loading reports it
        return None
    return GPU(f"{name} ({dev}, {free / GIB:.1f} GiB free)", int(free // MIB) + CUDA_CONTEXT // MIB, bool(bf16))


def fit_to_card(cfg: Config, log: Any = print) -> Fit | None:
    """train.fit=auto on CUDA: set the fit keys the user did not set, in place, before any weights load.

    Logs one line with the estimate; raises MinioprdError (one line, a rollout that fits) when even the leanest
    settings do not fit. Runs once per config (a second call, e.g. prepare after distill, does nothing).
    """
    if cfg.train.fit != "auto" or cfg.fit_note:
        return None
    card = detect_card(cfg)
    if card is None:
        return None
    try:
        t, s = model_shape(cfg.model.teacher), model_shape(cfg.model.student)
    except MinioprdError as e:  # no config to plan from (a hub model not yet downloaded): run as given
        cfg.fit_note = f"train.fit=auto: settings left as given, the planner has no shapes ({e})"
        log(cfg.fit_note)
        return None
    where = _resolve(cfg, None, None, card=card)
    concrete, objective, _reason = objective_for_plan(cfg, t, s, where)
    f = fit_settings(concrete, t, s, where)
    if not f.fits:
        raise MinioprdError(f"{t.name} -> {s.name} ({objective}) " + f.summary())
    for key, value in f.changed.items():
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, value)
    cfg.fit_note = f.summary()
    log(cfg.fit_note)
    return f
