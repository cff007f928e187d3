"""`loss.objective=auto`: which objective a teacher-student pair gets, and why.

Plain OPRD pulls the student's hidden states onto the teacher's. That only makes sense when the two share an
origin (the paper's setting: the teacher is a further-trained copy of the student), so their residual streams
live in the same coordinates. A teacher trained apart (another width or depth, or the same shape from another
initialisation) has states in its own coordinates, and output-space OPD, which only asks for the same
next-token distribution, is the stronger choice; a teacher with another tokenizer cannot be compared in
output space at all, so it gets OPRD-Bridge.

Two stages:
- `shape_hint` (no weights, used by `--dry-run` and `minioprd plan`): what the configs alone decide. Different
  tokenizers -> bridge; different shapes (layers or width) -> the OPD side; the same shape -> measured.
- `measure` at step 0 (same shape only): the plain cosine of the student's and the teacher's states at every
  mapped layer pair, on the student's own answers to the first prompts, with no map in between; `decide`
  turns the per-layer figures into the objective (`MIN_LAYER_COS`).

Why another depth goes to the OPD side without a measurement: a layer-dropped copy of the teacher shares its
origin in the blocks before the cut (cosine 1.00 there, mean 0.84 over layers), yet opd_full served it better
(README, SmolLM2 rows); a further depth or width means another architecture, not a further-trained copy.

Why the plain cosine: a least-squares map fitted between the two and then scored does not tell origins apart
at the sample sizes a first batch gives (it measures how predictable the teacher is from token identity: a
same-shape random teacher scored higher than the model against itself, issue 14); without a map, a shared
origin shows up directly as states pointing the same way.

`resolve` (called by `distill` when loss.objective=auto) measures or reuses the decision stored in the run
directory (`objective.json`), fits the bridge when the tokenizers differ (`bridge/` of the run directory),
and returns the decision; the run then proceeds exactly as with the picked objective set explicitly.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The objective auto picks for a teacher trained apart from the student: the exact full-vocabulary reverse
# KL. Alone, not + mu*OPRD: on the demo's wide pairing the OPRD term (through projections) lowered accuracy
# (50.2% vs 54.5%), through a bridge it changed nothing measurable (54.8%), on the layer-dropped SmolLM2 student
# it moved the KL within seed noise (0.96 vs 1.03) and it needs the hidden states captured (README, Results).
APART = "opd_full"
# oprd when the plain student-teacher cosine of every mapped layer is at least MIN_LAYER_COS. Measured (README,
# "How loss.objective=auto decides"): teachers from another init sit at chance (-0.05 ... 0.04 per layer), every
# further-trained copy far above it (the lowest layer: 0.445 for the test suite's briefly trained toy pair, 0.887
# for the demo's, 0.93 for SmolLM2 against its own 4-bit copy), so the threshold sits in that gap.
MIN_LAYER_COS = 0.3
MEASURE_TOKENS = 64  # longest answer of the measurement rollout (the run's rollout.max_new_tokens if smaller)
# The bridge auto fits when the tokenizers differ (Stage 0 on the run's own prompts, Stage 1 as `minioprd bridge`)
BRIDGE_PROMPTS = 256  # at most this many of the run's prompts, one answer each
BRIDGE_TOKENS = 256  # longest answer (the run's rollout.max_new_tokens if smaller)
BRIDGE_RANK = 4  # the paper's rank across tokenizers (8 for the same tokenizer)
BRIDGE_DIR, DECISION_FILE = "bridge", "objective.json"
NOTE = "# loss.objective=auto"  # first line of a run's config.yaml when auto decided


@dataclass(frozen=True)
class Hint:
    """What the shapes alone say. `objective` is None when only a measurement can decide."""

    objective: str | None  # "oprd" | APART | "bridge" | None (same shape: measured at step 0)
    reason: str


def shape_hint(student_shape: tuple[int, int], teacher_shape: tuple[int, int], same_tokenizer: bool = True) -> Hint:
    """Decide from (layers, width) of both models and whether they share a tokenizer, without weights."""
    (ls, ds), (lt, dt) = student_shape, teacher_shape
    if not same_tokenizer:
        return Hint("bridge", "the tokenizers differ: output-space objectives need a shared vocabulary, so "
                              "representations are matched through an OPRD-Bridge fitted on the run's prompts")
    if (ls, ds) != (lt, dt):
        return Hint(APART, f"student {ls}x{ds} and teacher {lt}x{dt} differ in shape: not a further-trained copy, "
                           f"so the states are not comparable layer by layer, coordinate by coordinate")
    return Hint(None, f"same shape ({ls}x{ds}): whether they share an origin is measured at step 0 (plain "
                      f"cosine of the states on the first rollout batch; oprd if every layer's is >= "
                      f"{MIN_LAYER_COS}, else {APART})")


@dataclass
class Decision:
    """What loss.objective resolved to, why, and the figures behind it (stored as `objective.json`)."""

    objective: str  # the resolved loss.objective (oprd also for a bridge)
    reason: str  # one line
    requested: str = "auto"
    figures: dict[str, Any] = field(default_factory=dict)  # layer_cos, mean_cos, min_cos, tokens
    bridge: str = ""  # the bridge auto fitted (loss.bridge), "" if none
    pair: list[Any] = field(default_factory=list)  # what it was decided for (`pair_of`): reused only for that

    @property
    def label(self) -> str:
        return "oprd_bridge" if self.bridge else self.objective

    def override(self) -> str:
        """The settings that choose the other side explicitly."""
        if self.bridge:
            return "loss.bridge=DIR (your own bridge, `minioprd bridge`)"
        return "loss.objective=oprd" if self.objective != "oprd" else f"loss.objective={APART}"

    def line(self) -> str:
        """One line for the console and config.yaml."""
        if self.requested != "auto":
            return f"loss.objective={self.objective} (set explicitly)"
        return f"loss.objective=auto -> {self.label}: {self.reason}; override with {self.override()}"

    def apply(self, cfg: Any) -> Any:
        """A copy of `cfg` with the objective (and the auto-fitted bridge) set."""
        cfg = copy.deepcopy(cfg)
        cfg.loss.objective = self.objective
        if self.bridge:
            cfg.loss.bridge = self.bridge
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def decide(layer_cos: list[float]) -> tuple[str, str]:
    """(objective, reason) from the plain per-layer cosines of student vs teacher states."""
    mean, low = sum(layer_cos) / len(layer_cos), min(layer_cos)
    figures = f"cosine of the states at step 0: mean {mean:.3f}, lowest layer {low:.3f} of {len(layer_cos)}"
    if low >= MIN_LAYER_COS:
        return "oprd", f"{figures} (>= {MIN_LAYER_COS}): a shared origin, so the states are matched directly"
    return APART, f"{figures} (oprd needs >= {MIN_LAYER_COS}; another init sits near 0): the teacher's states " \
                  f"live in other coordinates, so the next-token distributions are matched"


def measure(s: Any, tokens: int = MEASURE_TOKENS) -> dict[str, Any]:
    """Plain per-layer cosine of student vs teacher states (no projection) on the student's own answers to the
    run's first `rollout.prompts_per_step` prompts, at the positions OPRD would match (`loss.convention`).

    The rollout is seeded from train.seed on its own and the global RNG is restored, so the run that follows
    samples exactly as it would with the picked objective set explicitly. Needs equal widths.
    """
    import torch

    from minioprd.capture import capture_hidden
    from minioprd.layers import state_window
    from minioprd.losses import layer_cosines
    from minioprd.rollout import rollout

    cfg = s.cfg
    s_layers, t_layers = sorted({a for a, _ in s.pairs}), sorted({b for _, b in s.pairs})
    was = s.student.training
    s.student.eval()
    sums, rows = torch.zeros(len(s.pairs), dtype=torch.float64), 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(cfg.train.seed * 1_000_003 - 2)
        ro = rollout(s.student, s.tokenizer, s.prompts[:cfg.rollout.prompts_per_step], n=cfg.rollout.n,
                     temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                     max_new_tokens=min(tokens, cfg.rollout.max_new_tokens))
        B = ro.input_ids.shape[0]
        mb = cfg.rollout.micro_batch or B
        for i in range(0, B, mb):
            part = ro.select(slice(i, i + mb))
            if not part.response_mask.any():
                continue
            win = state_window(part.prompt_len, part.response_mask, cfg.loss.convention)
            pos = part.position_ids()
            got_t = capture_hidden(s.teacher, part.input_ids.to(s.teacher_device),
                                   part.attention_mask.to(s.teacher_device), pos.to(s.teacher_device), t_layers,
                                   win.start, win.stop)
            got_s = capture_hidden(s.student, part.input_ids, part.attention_mask, pos, s_layers, win.start, win.stop)
            teacher, student = dict(zip(t_layers, got_t)), dict(zip(s_layers, got_s))
            n = int(win.mask.sum())
            cos = layer_cosines([student[a] for a, _ in s.pairs], [teacher[b].to(s.device) for _, b in s.pairs],
                                win.mask.to(s.device))
            sums += cos.double().cpu() * n
            rows += n
    s.student.train(was)
    layer_cos = (sums / max(rows, 1)).tolist()
    return {"layer_cos": [round(c, 4) for c in layer_cos], "mean_cos": round(sum(layer_cos) / len(layer_cos), 4),
            "min_cos": round(min(layer_cos), 4), "tokens": rows, "pairs": [list(p) for p in s.pairs]}


# --------------------------------------------------------------------------------------------- the run dir


def pair_of(cfg: Any) -> list[Any]:
    """What a decision depends on besides the weights' files: the models, the teacher's quantization, the seed
    and the settings of the measurement rollout."""
    m, r = cfg.model, cfg.rollout
    return [m.student, m.teacher, m.teacher_quant, m.student_quant, m.dtype, cfg.train.seed, cfg.data.dataset,
            r.prompts_per_step, r.n, r.temperature, r.top_p, min(r.max_new_tokens, MEASURE_TOKENS),
            cfg.loss.layers, cfg.loss.teacher_layers, cfg.loss.convention]


def stored(out: str | Path, cfg: Any) -> Decision | None:
    """The decision an earlier start of this run wrote (`objective.json`) for this config's pair, if any."""
    p = Path(out) / DECISION_FILE
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
        got = Decision(d["objective"], d["reason"], d.get("requested", "auto"), d.get("figures", {}),
                       d.get("bridge", ""), d.get("pair", []))
    except (ValueError, KeyError, TypeError):
        return None  # damaged: decided again (the measurement is deterministic for the seed)
    return got if got.pair == json.loads(json.dumps(pair_of(cfg))) else None


def same_config(text: str, cfg: Any, out: str | Path) -> bool:
    """Does a run dir's config.yaml hold this config? Its note lines aside, and an auto config counts as the
    objective the run resolved it to (a rerun of the same command keeps the stored decision)."""
    from minioprd.config import to_yaml

    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    if body == to_yaml(cfg):
        return True
    d = stored(out, cfg) if cfg.loss.objective == "auto" else None
    return d is not None and body == to_yaml(d.apply(cfg))


def config_note(d: Decision) -> str:
    """The line config.yaml starts with when auto decided (the objective line below holds the result)."""
    return f"{NOTE} -> {d.label}: {d.reason}; override with {d.override()}\n" if d.requested == "auto" else ""


def resolve(s: Any, out: str | Path, log: Any = print) -> Decision:
    """Resolve loss.objective=auto for a prepared run (`distill.Setup`), in place: s.cfg gets the picked
    objective (and the auto-fitted bridge, loaded into s.bridge). A decision stored in the run dir is kept
    without measuring again (rerun, resume); otherwise the tokenizers, the widths, or the measurement at step 0
    decide, and the decision is written to `objective.json` before the first step. An explicit objective is
    returned as it is (tagged as auto's when it is the one this run dir's auto decision resolved to)."""
    from minioprd.capture import num_layers
    from minioprd.files import atomic_write_json

    cfg, out = s.cfg, Path(out)
    before = stored(out, cfg)
    resumed = before is not None and before.objective == cfg.loss.objective and before.bridge in ("", cfg.loss.bridge)
    if cfg.loss.objective != "auto" and not resumed:
        _note_explicit(s, log)
        return Decision(cfg.loss.objective, "set explicitly", requested=cfg.loss.objective)
    if before is not None:  # a rerun, or a resume from config.yaml (which holds the resolved objective)
        d = before
        log(f"loss.objective=auto: keeping this run's decision ({out / DECISION_FILE}), not measured again")
    else:
        shape_s = (num_layers(s.student), s.student.config.hidden_size)
        shape_t = (num_layers(s.teacher), s.teacher.config.hidden_size)
        hint = shape_hint(shape_s, shape_t, same_tokenizer=s.cross is None)
        if cfg.loss.bridge:  # a bridge the user fitted: representations are compared in its subspace
            d = Decision("oprd", f"loss.bridge={cfg.loss.bridge} is given, so the states are compared in its "
                                 f"subspace", pair=pair_of(cfg))
        elif hint.objective == "bridge":
            path = fit_bridge(s, out / BRIDGE_DIR, log)
            d = Decision("oprd", hint.reason, bridge=str(path), pair=pair_of(cfg))
        elif hint.objective is not None:
            d = Decision(hint.objective, hint.reason, pair=pair_of(cfg))
        else:
            figures = measure(s)
            objective, reason = decide(figures["layer_cos"])
            d = Decision(objective, reason, figures=figures, pair=pair_of(cfg))
        atomic_write_json(out / DECISION_FILE, d.to_dict())
    s.cfg = d.apply(cfg)
    if d.bridge:
        _use_bridge(s, d.bridge)
    log(d.line())
    if d.figures.get("layer_cos"):
        log("  per-layer cosine (student->teacher layer): " + ", ".join(
            f"{a}->{b} {c:.3f}" for (a, b), c in zip(d.figures["pairs"], d.figures["layer_cos"]))
            + f" on {d.figures['tokens']} response tokens")
    return d


def _note_explicit(s: Any, log: Any) -> None:
    """An explicit oprd where the shapes say the teacher was trained apart: say what auto would pick."""
    from minioprd.capture import num_layers

    if s.cfg.loss.objective != "oprd" or s.cfg.loss.bridge or s.cross is not None:
        return
    hint = shape_hint((num_layers(s.student), s.student.config.hidden_size),
                      (num_layers(s.teacher), s.teacher.config.hidden_size))
    if hint.objective == APART:
        log(f"note: loss.objective=oprd is set, but {hint.reason}; loss.objective=auto would pick {APART} (README: "
            f"how loss.objective=auto decides)")


def _use_bridge(s: Any, path: str) -> None:
    """Load the bridge into the setup as `prepare` does for loss.bridge."""
    from torch import nn

    from minioprd.bridge import load_bridge

    cfg = s.cfg
    s.bridge = load_bridge(path, cfg.model.student, cfg.model.teacher, s.pairs,
                           student_hidden=s.student.config.hidden_size, teacher_hidden=s.teacher.config.hidden_size,
                           device=s.device, trainable=cfg.loss.bridge_trainable)
    s.projections = s.bridge.student_projections if cfg.loss.bridge_trainable else nn.ModuleList()


def fit_bridge(s: Any, path: Path, log: Any = print) -> Path:
    """OPRD-Bridge for a teacher with another tokenizer: Stage 0 on at most BRIDGE_PROMPTS of the run's prompts
    (a seeded sample, one answer of at most BRIDGE_TOKENS each, the student before any update), Stage 1 at rank
    BRIDGE_RANK, saved in `path` (the run dir's bridge/). A complete bridge already there is reused."""
    import random
    import shutil

    import torch

    from minioprd.bridge import META, collect, fit, model_key, save_bridge
    from minioprd.capture import num_layers

    if (path / META).is_file():
        log(f"bridge: reusing {path}")
        return path
    cfg = s.cfg
    n = min(len(s.prompts), BRIDGE_PROMPTS)
    pick = sorted(random.Random(f"minioprd-auto-bridge:{cfg.train.seed}").sample(range(len(s.prompts)), n))
    tokens = min(BRIDGE_TOKENS, cfg.rollout.max_new_tokens)
    log(f"loss.objective=auto: the tokenizers differ, fitting an OPRD-Bridge (rank {BRIDGE_RANK}) on {n} of the "
        f"run's prompts, answers of <= {tokens} tokens, into {path}")
    meta = {"student": cfg.model.student, "student_key": model_key(cfg.model.student),
            "teacher": cfg.model.teacher, "teacher_key": model_key(cfg.model.teacher),
            "student_layers": num_layers(s.student), "teacher_layers": num_layers(s.teacher),
            "same_tokenizer": s.cross is None, "convention": cfg.loss.convention, "align_mode": cfg.loss.align, "prompts": n, "max_new_tokens": tokens, "dataset": cfg.data.dataset,
            "teacher_quant": cfg.model.teacher_quant, "auto": True}
    states = path / "states"
    was = s.student.training
    with torch.random.fork_rng(devices=[]):
        info = collect(s.student, s.teacher, s.tokenizer, [s.prompts[i] for i in pick], s.pairs, states,
                       cross=s.cross, max_new_tokens=tokens, batch_size=cfg.rollout.prompts_per_step * cfg.rollout.n,
                       temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, convention=cfg.loss.convention,
                       seed=cfg.train.seed, meta=meta, log=log)
        fits, split = fit(states, (BRIDGE_RANK,), seed=cfg.train.seed, device=s.device, log=log)
    s.student.train(was)
    meta["collect"] = {k: info[k] for k in ("rows", "tokens", "response_len", "aligned_frac") if k in info}
    meta["fit"] = {"rank": BRIDGE_RANK, "seed": cfg.train.seed, **split}
    save_bridge(path, fits[BRIDGE_RANK], meta)
    shutil.rmtree(states, ignore_errors=True)
    return path


def dry_run_line(cfg: Any, student_shape: tuple[int, int], teacher_shape: tuple[int, int]) -> str:
    """`--dry-run`: what the shapes suggest for loss.objective=auto (no weights are loaded)."""
    if cfg.loss.objective != "auto":
        return f"objective: {cfg.loss.objective} (set explicitly)"
    same = True
    try:
        from minioprd.cross_tokenizer import same_tokenizer
        from minioprd.models import load_tokenizer, resolve_model

        same = same_tokenizer(load_tokenizer(resolve_model(cfg.model.student, "student"), "student"),
                              load_tokenizer(resolve_model(cfg.model.teacher, "teacher"), "teacher"))
    except Exception:  # noqa: BLE001 - tokenizers out of reach (offline hub names): judged by the shapes only
        pass
    hint = shape_hint(student_shape, teacher_shape, same)
    pick = {None: "measured at step 0", "bridge": "oprd through an OPRD-Bridge fitted at step 0"}.get(
        hint.objective, hint.objective)
    return f"objective: auto -> {pick}: {hint.reason}; set loss.objective=oprd|opd_full|... to choose yourself"
