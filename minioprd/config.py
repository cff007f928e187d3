"""Typed run configuration: nested dataclasses, a help string on every field, validation that reports
every problem at once.

A recipe is a YAML file with the same sections (`model`, `lora`, `data`, `rollout`, `loss`, `train`);
command-line flags and `section.key=value` overrides are applied on top, in that order:

    cfg = load_config("recipes/tiny-cpu.yaml", {"train.steps": 5, "loss.kind": "cosine"})
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from minioprd.errors import ConfigError

LAYER_SETS = ("all", "last", "even", "odd")
POSITION_SETS = ("all", "last", "last_k", "first_k")
CACHE_BUCKET = 128  # static KV cache lengths are rounded up to this, so other prompt lengths reuse a compiled step


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (shown by `--dry-run` comments and the docs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    """> Which models, and how they are loaded."""

    teacher: str = _f("builtin:tiny-teacher", "Teacher: local directory, hub id, or a known short name "
                      "such as Qwen2.5-7B (resolved to Qwen/Qwen2.5-7B). `builtin:tiny-teacher` is an offline toy.")
    student: str = _f("builtin:tiny-student", "Student: local directory, hub id or known short name; "
                      "its tokenizer drives rollouts and the teacher must tokenize text the same way.")
    teacher_quant: str = _f("4bit", "Teacher weights: 4bit (bitsandbytes NF4, double quant), 8bit, or none "
                            "(bf16 on GPU, fp32 on CPU).", choices=("4bit", "8bit", "none"))
    student_quant: str = _f("none", "Student base weights: none, or 4bit for QLoRA (saves memory on a T4).",
                            choices=("none", "4bit"))
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    teacher_device: str = _f("same", "Device for the teacher: `same` as the student, or e.g. cuda:1 "
                             "(Kaggle 2xT4 puts the teacher on the second card).")
    trust_remote_code: bool = _f(False, "Run model code shipped with a hub repo (off: only architectures "
                                 "transformers knows are loaded).")
    dtype: str = _f("auto", "Compute dtype: auto (bf16 on GPUs that support it, fp16 on a T4, fp32 on CPU), "
                    "bf16, fp16 or fp32.", choices=("auto", "bf16", "fp16", "fp32"))


@dataclass
class LoraConfig:
    """> The student's LoRA adapter (peft)."""

    r: int = _f(16, "LoRA rank. Higher adapts more and costs more memory. 0 = full fine-tuning of the student "
                "(every weight trains; the run saves a whole model in model/ instead of adapter/).", min=0)
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r).", min=1)
    dropout: float = _f(0.0, "LoRA dropout; 0 keeps rollouts and the update on exactly the same policy.",
                        min=0.0, max=0.9)
    target_modules: Any = _f("all-linear", "Modules to adapt: all-linear (every linear layer of the blocks) "
                             "or a list such as [q_proj, v_proj].")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30% slower.")


@dataclass
class DataConfig:
    """> The prompts the student answers on-policy."""

    dataset: str = _f("builtin:arithmetic", "Hub data set name, or a local .jsonl/.json/.parquet/.csv file. "
                      "`builtin:arithmetic` is an offline toy set.")
    split: str = _f("train", "Split to read (local files have only `train`).")
    field: str = _f("auto", "Column holding the prompt: auto tries prompt, question, problem, messages.")
    prompt_template: str = _f("{prompt}", "Python format string applied to each prompt; must contain {prompt}.")
    prompt_suffix: str = _f("", "Text appended to every prompt (e.g. the boxed-answer instruction).")
    chat_template: str = _f("auto", "Wrap prompts in the student's chat template: auto (if it has one), "
                            "true or false.", choices=("auto", "true", "false"))
    max_prompt_tokens: int = _f(512, "Longest prompt in tokens; longer ones are handled by `long_prompts`.",
                                min=1)
    long_prompts: str = _f("skip", "skip (counted and reported) or truncate (keep the end) prompts longer "
                           "than max_prompt_tokens.", choices=("skip", "truncate"))
    max_prompts: int = _f(0, "Use at most this many prompts (0 = all).", min=0)
    shuffle: bool = _f(True, "Shuffle prompts (seeded by train.seed).")


@dataclass
class RolloutConfig:
    """> On-policy sampling from the student (HF generate with its KV cache)."""

    prompts_per_step: int = _f(4, "Prompts per optimizer step.", min=1)
    n: int = _f(2, "Responses sampled per prompt (the paper uses 2).", min=1)
    temperature: float = _f(1.0, "Sampling temperature (the paper: 1.0).", min=0.0, max=10.0)
    top_p: float = _f(1.0, "Nucleus sampling top-p.", min=0.0, max=1.0, min_open=True)
    max_new_tokens: int = _f(256, "Longest response in tokens.", min=1)
    micro_batch: int = _f(0, "Sequences per forward/backward in the update (0 = all at once); gradients "
                          "are accumulated over micro-batches.", min=0)
    merge_lora: bool = _f(False, "Merge the LoRA weights into the base for the rollout and unmerge after "
                          "(unquantized base only). Merge/unmerge rounding moves the base weights a little every "
                          "step (~1e-7 in fp32, more in fp16), so it is off; on a CPU rollout.pack_weights folds "
                          "the adapter into its packed copy instead (1.24x vs 2.32x bare generate at the "
                          "Qwen2.5-0.5B shape, `minioprd bench rollout`), leaving the base untouched.")
    cache: str = _f("auto", f"KV cache for rollouts: static (preallocated, length rounded up to {CACHE_BUCKET}, kept "
                    "between steps, so every step has the same shapes: what compile needs), dynamic (grows per "
                    "token), or auto (static on a GPU, dynamic on a CPU). Falls back to dynamic, with a note, where "
                    "a model does not support it.",
                    choices=("auto", "static", "dynamic"))
    compile: str = _f("auto", "torch.compile the decode step (needs the static cache; the first rollout compiles, "
                      "a minute or more): true, false, or auto (on a GPU only). Skipped with a note where the "
                      "weights cannot be compiled (a bitsandbytes 4-bit student).", choices=("auto", "true", "false"))
    pack_weights: str = _f("auto", "CPU rollouts compute every linear layer from a oneDNN-packed copy of its weight "
                           "(the LoRA update folded in, base weights untouched) instead of MKL re-packing it at every "
                           "decode step: 2-3x faster decode steps at a real shape, one extra copy of the linear "
                           "weights while generating, tokens equal up to float rounding. true, false, or auto (on a "
                           "CPU when the linear weights exceed 64 MiB, i.e. any cache; never with rollout.compile).",
                           choices=("auto", "true", "false"))
    share_prefill: bool = _f(True, "The n responses of a prompt share one prefill of it (its KV cache is repeated "
                             "after the prefill); same tokens as n separate prefills.")
    sort_by_length: bool = _f(False, "Put prompts of similar token length into the same step (like HF Trainer's "
                              "group_by_length), so the rollout left-pads less: each epoch's seeded order is cut into "
                              "pools of 50 x prompts_per_step prompts, each pool sorted by length and cut into steps, "
                              "the steps shuffled; within a step the longest come first, so the per-process shares "
                              "are alike too. Every prompt is still used once per epoch, but it changes which "
                              "prompts train together (a step's prompts are no longer independent draws), so it is "
                              "off; a checkpoint resumes only with the setting it was written with.")


@dataclass
class LossConfig:
    """> The representation loss (paper Eq. 6) and which states it compares."""

    objective: str = _f("auto", "auto (default: picked for the pair before the first step and written to "
                        "config.yaml with its reason: oprd when the student's and teacher's states already point "
                        "the same way, i.e. a shared origin, measured at step 0; opd_full for a teacher trained "
                        "apart or of another shape; oprd through an OPRD-Bridge fitted on the run's prompts when the "
                        "tokenizers differ), oprd (representation loss only, the paper's main setting), or an "
                        "output-space OPD objective: opd_sampled (sampled-token REINFORCE), opd_topk (student's "
                        "top-k), opd_full (exact reverse KL, chunked). With an OPD objective and mu > 0 the loss is "
                        "L_OPD + mu * L_OPRD (paper Eq. 7), one teacher forward.",
                        choices=("auto", "oprd", "opd_sampled", "opd_topk", "opd_full"))
    mu: float = _f(0.0, "Weight of the representation loss added to an OPD objective (Eq. 7; the paper tries "
                   "1 and 10). Ignored for objective=oprd (use coef).", min=0.0)
    topk: int = _f(16, "k of opd_topk (the authors' default 16).", min=1)
    opd_chunk: int = _f(512, "Rows of logits computed at a time by the OPD losses (memory vs speed).", min=1)
    kind: str = _f("scale_mse", "Loss per layer: mse (paper Eq. 6: ||h_S-h_T||^2/d), scale_mse (mse divided "
                   "by the teacher layer's mean squared norm, so every layer counts alike), normalized_mse "
                   "(both L2-normalised first), cosine (1 - cos).")
    coef: float = _f(1.0, "Coefficient of the representation loss.", min=0.0)
    layers: Any = _f("all", "Student layers: all (HF hidden_states[1..L], the last is after the final "
                     "norm), last, even, odd, or a list of 1-based layer indices.")
    teacher_layers: Any = _f("auto", "Teacher layers for the student's: auto = proportional map "
                             "round(linspace(0, L_T-1, L_S)) (paper Eq. 11), or an explicit list.")
    positions: str = _f("all", "Response positions in the loss: all, last, last_k or first_k.",
                        choices=POSITION_SETS)
    k: int = _f(2000, "Window for last_k / first_k (the paper: last 2000).", min=1)
    convention: str = _f("predict", "Which hidden state belongs to response token t: predict = the state at "
                         "t-1 that predicts it (default; the positions output-space OPD uses), token = the "
                         "state at t (the authors' code, for faithful reproduction).",
                         choices=("predict", "token"))
    bridge: str = _f("", "OPRD-Bridge directory from `minioprd bridge`: compare student and teacher in its frozen "
                     "r-dim subspace (paper Eqs. 14-15; use kind=normalized_mse, coef ~10).")
    projection_init: str = _f("lstsq", "Width projections (student and teacher widths differ) start at the "
                              "least-squares map from the student's to the teacher's states on one rollout batch "
                              "before the first step (lstsq), or random (plain OPRD then collapsed on the demo's "
                              "wide pairing).", choices=("lstsq", "random"))
    bridge_trainable: bool = _f(False, "Train the bridge's student projection jointly (the paper reports it "
                                "worse; off).")
    align: str = _f("cover", "Different tokenizers: cover (each student token's state is the teacher token "
                    "covering its end) or exact (only tokens whose ends coincide; others masked).",
                    choices=("cover", "exact"))
    reduction: str = _f("sequence", "sequence = per-sequence mean over positions, then mean over sequences "
                        "(paper Eq. 6); token = one mean over all positions of the batch (authors' code).",
                        choices=("sequence", "token"))

    def has_representation_term(self) -> bool:
        """Whether the loss compares hidden states (objective oprd, or an OPD objective with mu > 0): only then
        are states captured and width projections made. `auto` must be resolved first."""
        return self.objective == "oprd" or self.mu > 0


@dataclass
class EvalConfig:
    """> In-loop evaluation (every train.eval_every steps) and best-checkpoint keeping."""

    dataset: str = _f("", "Held-out set with answers (file or hub); empty = hold out eval.holdout prompts from "
                      "the training data, so the test set is never used to pick a checkpoint.")
    split: str = _f("test", "Split of eval.dataset.")
    holdout: int = _f(16, "Prompts held out from training when eval.dataset is empty (0 = none: only for a "
                      "custom evaluator passed to distill()).", min=0)
    task: bool = _f(True, "Task accuracy (greedy avg@1, graded with math-verify) when the prompts have answers.")
    alignment: bool = _f(True, "Per-layer cosine and reverse KL to the teacher on the student's own responses "
                               "(no KL when the tokenizers differ).")
    max_new_tokens: int = _f(256, "Longest evaluation response.", min=1)
    batch_size: int = _f(16, "Prompts per evaluation batch.", min=1)
    metric: str = _f("auto", "Metric that picks the best checkpoint: auto (accuracy if there are answers, else "
                     "kl, else cos when the tokenizers differ), accuracy, kl or cos.",
                     choices=("auto", "accuracy", "kl", "cos"))
    keep_best: bool = _f(True, "Copy the adapter to best/ whenever the metric improves.")


@dataclass
class TrainConfig:
    """> Optimisation, logging and checkpoints."""

    output_dir: str = _f("runs/minioprd", "Where config.yaml, metrics.jsonl, checkpoints and adapter/ go.")
    steps: int = _f(100, "Optimizer steps (one fresh rollout batch each).", min=1)
    lr: float = _f(1e-4, "AdamW learning rate. LoRA wants ~10x the paper's full-fine-tuning 1e-5.",
                   min=0.0, min_open=True, max=1.0)
    projection_lr: float = _f(0.0, "Learning rate of the width projections (0 = same as lr).", min=0.0)
    warmup_ratio: float = _f(0.03, "Fraction of steps of linear warm-up before cosine decay (paper: 3%).",
                             min=0.0, max=1.0)
    min_lr_ratio: float = _f(0.1, "Cosine decays to lr * min_lr_ratio.", min=0.0, max=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0)
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0 = off).", min=0.0)
    fp16_loss_scale: bool = _f(True, "When the student computes in fp16 (a T4): scale the loss up (from 2^16, "
                                     "halved on overflow, doubled after 100 clean steps) for backward, so small "
                                     "gradients do not flush to zero in fp16 activations.")
    seed: int = _f(0, "Seed for data order, sampling and initialisation.")
    log_every: int = _f(1, "Write a metrics line every N steps.", min=1)
    save_every: int = _f(0, "Save a resumable checkpoint every N steps (0 = none; the final adapter is always "
                         "saved).", min=0)
    keep_checkpoints: int = _f(2, "Keep the newest N checkpoints (0 = all).", min=0)
    threads: int = _f(0, "torch CPU threads (0 = number of cores).", min=0)
    eval_every: int = _f(0, "Evaluate every N steps and before the first (settings in the eval section); "
                         "0 = off.", min=0)
    report_to: Any = _f([], "Also send metrics to these trackers when installed: [tensorboard], [wandb] "
                        "(metrics.jsonl is always written).")
    fit: str = _f("auto", "Memory settings for the card (CUDA only; nothing on a CPU): auto = before any weights load, "
                  "the planner picks the settings you did not set yourself (lora.gradient_checkpointing, "
                  "rollout.micro_batch, loss.opd_chunk) for the detected card's free memory, fastest first, and "
                  "stops with a proposal when even the leanest do not fit; off = the plain defaults.",
                  choices=("auto", "off"))
    collapse_threshold: float = _f(0.25, "Warn when the rollouts' distinct-token ratio falls below this "
                                   "(the student is collapsing into repetition).", min=0.0, max=1.0)
    collapse_repetition: float = _f(0.5, "Warn when more than this fraction of the student's answers loop (a "
                                    "4-gram 3 times in the last 32 tokens), in the rollouts or in the in-loop "
                                    "eval's greedy answers, where collapse shows first.", min=0.0, max=1.0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # Not fields (to_dict, to_yaml and validate see only the sections): the dotted keys a recipe, flag or
        # override set explicitly, which train.fit never changes, and the line train.fit logged once it ran.
        self.explicit: set[str] = set()
        self.fit_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _section_classes() -> dict[str, type]:
    return typing.get_type_hints(Config)


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, typ: Any, key: str) -> tuple[Any, str | None]:
    """Turn a YAML/CLI value into the field's type; return (value, problem-or-None)."""
    if typ is Any:
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                return yaml.safe_load(value), None
            except yaml.YAMLError:
                return value, f"{key}: could not read list {value!r}"
        return value, None
    if typ is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True, None
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False, None
        return value, f"{key}: expected true or false, got {value!r}"
    if typ in (int, float):
        if isinstance(value, bool):
            return value, f"{key}: expected a number, got {value!r}"
        try:
            if typ is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value), None
            return float(value), None
        except (TypeError, ValueError):
            return value, f"{key}: expected {'an integer' if typ is int else 'a number'}, got {value!r}"
    if typ is str:
        if isinstance(value, (dict, list)):
            return value, f"{key}: expected text, got {value!r}"
        if isinstance(value, bool):  # yaml reads `true` as bool; the str fields spell choices as text
            return str(value).lower(), None
        return str(value), None
    return value, None


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(options)})"


def apply_overrides(cfg: Config, overrides: dict[str, Any], problems: list[str], source: str = "") -> None:
    """Set dotted keys (`train.lr`) on cfg; unknown keys and bad types go to `problems`."""
    classes = _section_classes()
    where = f" in {source}" if source else ""
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in classes:
            problems.append(f"unknown config section {section!r}{where}{_suggest(section, list(classes))}")
            continue
        if not name:
            problems.append(f"{key!r}{where}: give a key inside the section, e.g. {section}.<key>")
            continue
        sub = getattr(cfg, section)
        names = [f.name for f in dataclasses.fields(sub)]
        if name not in names:
            problems.append(f"unknown config key {key!r}{where}{_suggest(name, names)}")
            continue
        coerced, problem = _coerce(value, _type_of(type(sub), name), key)
        if problem:
            problems.append(problem + where)
        else:
            setattr(sub, name, coerced)
            cfg.explicit.add(key)


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if isinstance(body, dict):
            for k, v in body.items():
                flat[f"{section}.{k}"] = v
        else:
            flat[str(section)] = body  # reported as unknown/misplaced by apply_overrides
    return flat


def is_explicit(cfg: Config, key: str) -> bool:
    """Whether the user chose `key` (a recipe, flag or override set it, or code changed it from its default)."""
    section, _, name = key.partition(".")
    default = getattr(type(getattr(cfg, section))(), name)
    return key in getattr(cfg, "explicit", ()) or getattr(getattr(cfg, section), name) != default


def field_problems(obj: Any, key: Callable[[str], str]) -> list[str]:
    """The choices/min/max problems of one dataclass's fields (their `_f` metadata), each naming the setting
    (`key(field name)`), its value and what is allowed."""
    problems: list[str] = []
    for f in dataclasses.fields(obj):
        v, m, name = getattr(obj, f.name), f.metadata, key(f.name)
        if "choices" in m and v not in m["choices"]:
            problems.append(f"{name} must be one of {', '.join(m['choices'])}, got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi = m.get("min"), m.get("max")
            if lo is not None and (v < lo or (m.get("min_open") and v == lo)):
                op = ">" if m.get("min_open") else ">="
                problems.append(f"{name} must be {op} {lo}" + (f" and <= {hi}" if hi is not None else "")
                                + f", got {v}")
            elif hi is not None and v > hi:
                problems.append(f"{name} must be <= {hi}, got {v}")
    return problems


def help_of(cls: type, name: str) -> str:
    """A field's help text: the CLI's option help for the command configs below is the config's own."""
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _device_problem(flag: str, dev: str) -> list[str]:
    ok = dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
    return [] if ok else [f"{flag} must be auto, cpu, cuda or cuda:N, got {dev!r}"]


@dataclass
class EvalCommandConfig:
    """`minioprd eval`: task accuracy of models (--model), or a student's alignment to its teacher (--teacher)."""

    models: list[str] = _f([], "Model to evaluate, repeatable: name/hub id/dir, an adapter or run dir, BASE+ADAPTER; "
                           "add @4bit to load it in 4 bit.")
    dataset: str = _f("", "Hub data set, local jsonl/json/parquet/csv, or builtin:arithmetic.")
    output_dir: str = _f("", "Where samples.jsonl and summary.json go; rerun with the same dir to resume.")
    preset: str | None = _f(None, "Data format: aime24, aime25, amc23, aimo, math500, minerva, olympiad, math-train, "
                            "dapo, matharena, gsm8k.")
    split: str = _f("test", "Split of a hub data set.")
    field: str = _f("auto", "Problem column (default: the preset's, or auto-detect).")
    answer_field: str = _f("auto", "Answer column; dotted names read a struct (reward_model.ground_truth).")
    k: int = _f(1, "Samples per problem (avg@k, pass@k, maj@k).", min=1)
    temperature: float = _f(0.7, "Sampling temperature (the paper's 0.7).", min=0.0)
    top_p: float = _f(0.95, "Nucleus sampling (the paper's 0.95).", min=0.0, min_open=True, max=1.0)
    greedy: bool = _f(False, "Greedy decoding (then k must be 1).")
    max_new_tokens: int = _f(4096, "Token budget per response.", min=1)
    batch_size: int = _f(16, "Sequences per generate call.", min=1)
    prompt_suffix: str | None = _f(None, "Text after each problem (default: the preset's, else the paper's boxed "
                                   "instruction; '' for none).")
    chat_template: str = _f("auto", "auto, true or false.", choices=("auto", "true", "false"))
    max_prompt_tokens: int = _f(4096, "Longer prompts are skipped (and counted).", min=1)
    max_problems: int = _f(0, "Only the first N problems (0 = all).", min=0)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N.")
    dtype: str = _f("auto", "auto, bf16, fp16 or fp32.", choices=("auto", "bf16", "fp16", "fp32"))
    seed: int = _f(0, "Random seed.")
    teacher: str | None = _f(None, "Alignment mode: the teacher to compare the student with.")
    student: str | None = _f(None, "Alignment mode: the student (a model, or a run/adapter dir).")
    adapter: str | None = _f(None, "Alignment mode: the run's adapter (or run dir).")
    teacher_quant: str = _f("4bit", "Alignment mode: teacher weights, 4bit, 8bit or none.",
                            choices=("4bit", "8bit", "none"))
    layers: str = _f("all", "Alignment mode without a run: student layers to compare (all, last, even, odd).",
                     choices=LAYER_SETS)

    @property
    def alignment(self) -> bool:
        return bool(self.teacher or self.student or self.adapter)

    def check(self) -> None:
        """Every problem with these settings, as one ConfigError (flag, value, what is allowed)."""
        problems = field_problems(self, _flag) + _device_problem("--device", self.device)
        if not self.dataset:
            problems.append("pass --dataset (a local file, a hub data set or builtin:arithmetic)")
        if not self.output_dir:
            problems.append("pass --output-dir DIR (a rerun with the same DIR resumes)")
        if self.greedy and self.k > 1:
            problems.append(f"greedy decoding gives {self.k} identical samples per problem: use k=1 with --greedy, "
                            f"or sample (drop --greedy)")
        if self.alignment and self.models:
            problems.append("--model is for task accuracy, --teacher/--student/--adapter for alignment: run them "
                            "as two commands")
        elif self.alignment and not self.teacher:
            problems.append("alignment mode needs --teacher MODEL")
        elif not self.alignment and not self.models:
            problems.append("pass --model at least once (or --teacher/--student for alignment)")
        if problems:
            raise ConfigError(problems)


@dataclass
class BridgeCommandConfig:
    """`minioprd bridge`: fit an OPRD-Bridge (paper Eqs. 11-15) for a teacher and a student."""

    teacher: str | None = _f(None, "Teacher: dir, hub id or name (Qwen2.5-7B).")
    student: str | None = _f(None, "Student: dir, hub id or name (Qwen2.5-0.5B).")
    dataset: str | None = _f(None, "Prompts: hub data set or local jsonl/json/parquet/csv.")
    output: str = _f("", "Bridge directory (bridge.safetensors + bridge.json; other swept ranks in rank-R/).")
    rank: int = _f(8, "Rank r of the saved bridge (the paper: 8; 4 across tokenizers).", min=1)
    ranks: str | None = _f(None, "Rank sweep, e.g. 4,8,16: mean validation cosine per rank.")
    prompts: int = _f(2000, "Stage 0: prompts answered by the student (one response each).", min=1)
    max_new_tokens: int = _f(512, "Stage 0: longest response.", min=1)
    max_rows: int = _f(16384, "Response positions kept per layer (PCA and P_S rows).", min=2)
    epochs: int = _f(20, "Stage 1: AdamW epochs per projection.", min=0)
    lr: float = _f(1e-4, "Stage 1: AdamW learning rate.", min=0.0, min_open=True)
    fit_batch_size: int = _f(256, "Stage 1: rows per AdamW step.", min=1)
    init: str = _f("lstsq", "Stage 1 start of P_S: lstsq (closed-form MSE fit) or random (the authors').",
                   choices=("lstsq", "random"))
    batch_size: int = _f(16, "Stage 0: prompts per generate call.", min=1)
    layers: str = _f("all", "Student layers: all, last, even or odd (mapped by Eq. 11).", choices=LAYER_SETS)
    convention: str = _f("predict", "predict or token: which state belongs to a response token.",
                         choices=("predict", "token"))
    align_mode: str = _f("cover", "Different tokenizers: cover (end-covering teacher token) or exact (only tokens "
                         "ending where a teacher token ends).", choices=("cover", "exact"))
    teacher_quant: str = _f("4bit", "Teacher weights: 4bit, 8bit or none.", choices=("4bit", "8bit", "none"))
    device: str = _f("auto", "auto, cpu, cuda or cuda:N.")
    dtype: str = _f("auto", "auto, bf16, fp16 or fp32.", choices=("auto", "bf16", "fp16", "fp32"))
    split: str = _f("train", "Split of a hub data set.")
    field: str = _f("auto", "Prompt column (default: auto-detect).")
    prompt_template: str = _f("{prompt}", "Python format string around each prompt.")
    prompt_suffix: str = _f("", "Text appended to every prompt.")
    chat_template: str = _f("auto", "auto, true or false.", choices=("auto", "true", "false"))
    max_prompt_tokens: int = _f(512, "Longer prompts are skipped.", min=1)
    temperature: float = _f(1.0, "Stage 0 sampling temperature (the paper: 1.0).", min=0.0)
    top_p: float = _f(1.0, "Stage 0 nucleus sampling.", min=0.0, min_open=True, max=1.0)
    seed: int = _f(0, "Random seed.")
    threads: int = _f(0, "torch CPU threads (0 = all cores).", min=0)
    states: str | None = _f(None, "Refit from states collected before (a --keep-states run's OUTPUT/states): "
                            "skips Stage 0.")
    keep_states: bool = _f(False, "Keep Stage 0's states in OUTPUT/states.")
    force: bool = _f(False, "Replace a bridge already in --output.")

    def check(self) -> None:
        """Every problem with these settings, as one ConfigError (flag, value, what is allowed)."""
        problems = field_problems(self, lambda n: _flag("align" if n == "align_mode" else n))
        problems += _device_problem("--device", self.device)
        if not self.output:
            problems.append("pass --output DIR (where bridge.safetensors and bridge.json go)")
        if self.states is None and not (self.teacher and self.student and self.dataset):
            problems.append("pass --teacher, --student and --dataset (or --states DIR to refit collected states)")
        if "{prompt}" not in self.prompt_template:
            problems.append(f"--prompt-template must contain {{prompt}}, got {self.prompt_template!r}")
        if problems:
            raise ConfigError(problems)


def validate(cfg: Config) -> list[str]:
    """All range and choice problems, each naming the key, the value and what is allowed."""
    problems: list[str] = []
    for sec in dataclasses.fields(cfg):
        problems += field_problems(getattr(cfg, sec.name), lambda name, sec=sec.name: f"{sec}.{name}")
    from minioprd.losses import REP_LOSSES  # late import: losses imports torch

    if cfg.loss.kind not in REP_LOSSES:
        problems.append(f"loss.kind must be one of {', '.join(REP_LOSSES)}, got {cfg.loss.kind!r}")
    layers = cfg.loss.layers
    if isinstance(layers, str) and layers not in LAYER_SETS:
        problems.append(f"loss.layers must be one of {', '.join(LAYER_SETS)} or a list of layer numbers, "
                        f"got {layers!r}")
    if isinstance(layers, list) and (not layers or not all(isinstance(x, int) and not isinstance(x, bool)
                                                            for x in layers)):
        problems.append(f"loss.layers as a list must hold layer numbers (1-based), got {layers!r}")
    tl = cfg.loss.teacher_layers
    if not (tl == "auto" or (isinstance(tl, list) and tl and all(isinstance(x, int) for x in tl))):
        problems.append(f"loss.teacher_layers must be auto or a list of layer numbers, got {tl!r}")
    if "{prompt}" not in cfg.data.prompt_template:
        problems.append(f"data.prompt_template must contain {{prompt}}, got {cfg.data.prompt_template!r}")
    rt = cfg.train.report_to
    if not (isinstance(rt, list) and all(x in ("tensorboard", "wandb") for x in rt)):
        problems.append(f"train.report_to must be a list of tensorboard, wandb, got {rt!r}")
    tm = cfg.lora.target_modules
    if not (isinstance(tm, str) or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm))):
        problems.append(f"lora.target_modules must be all-linear or a list of module names, got {tm!r}")
    for key, dev in (("model.device", cfg.model.device), ("model.teacher_device", cfg.model.teacher_device)):
        ok = dev in ("auto", "cpu", "cuda", "same") or (dev.startswith("cuda:") and dev[5:].isdigit())
        if not ok or (key == "model.device" and dev == "same"):
            problems.append(f"{key} must be auto, cpu, cuda or cuda:N{' or same' if 'teacher' in key else ''}, "
                            f"got {dev!r}")
    return problems


def load_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- recipe YAML <- overrides; raises ConfigError listing every problem."""
    cfg, problems = Config(), []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError([f"recipe file {str(path)!r} not found: pass a path to a YAML file "
                               f"(see recipes/ for examples)"])
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"recipe {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"recipe {str(path)!r} must be a mapping of sections (model, lora, data, ...)"])
        apply_overrides(cfg, _flatten(data), problems, source=str(path))
    apply_overrides(cfg, dict(overrides or {}), problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict()` output (e.g. a run's config.yaml)."""
    cfg, problems = Config(), []
    apply_overrides(cfg, _flatten(data), problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_yaml(cfg: Config, comments: bool = True) -> str:
    """The resolved config as YAML; with comments, each key carries its help text."""
    if not comments:
        return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    lines: list[str] = []
    for sec in dataclasses.fields(cfg):
        sub = getattr(cfg, sec.name)
        lines.append(f"{sec.name}:")
        for f in dataclasses.fields(sub):
            val = yaml.safe_dump(getattr(sub, f.name), default_flow_style=True, width=10_000).strip()
            if val.endswith("\n..."):
                val = val[:-4].strip()
            val = val.removesuffix("...").strip()
            lines.append(f"  {f.name}: {val}  # {f.metadata['help']}")
    return "\n".join(lines) + "\n"

