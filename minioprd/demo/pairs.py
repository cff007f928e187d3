"""The demo's models, the paper's setting rebuilt in miniature and cached under `$MINIOPRD_HOME/demo/<key>/`:

  student       a Qwen2 (2 blocks, width 64) trained with cross-entropy on the reference solutions until its
                validation accuracy first reaches ~25%;
  teacher       the same run, `teacher_steps` further: a further-trained copy of the student (shared origin,
                like JustRL-1.5B from R1-Distill-1.5B);
  wide teacher  a wider, deeper Qwen2 (3 blocks, width 96) trained separately from scratch: a different origin
                and width, so the width projections (and the limits of vanilla OPRD) are exercised.

The tokenizer is the offline ChatML one of `builtin/tiny.py`; the models are standard HF Qwen2.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from minioprd.demo.task import TestSet, encode_prompts, task_splits
from minioprd.errors import MinioprdError
from minioprd.files import atomic_write_json, build_once, home

PAIR_VERSION = "v1"
VOCAB_ROWS = 512
# name -> (hidden, layers, heads, kv heads, mlp)
ARCHS = {"small": (64, 2, 4, 2, 256), "wide": (96, 3, 4, 2, 256)}
PAIRINGS = ("shared", "wide")  # shared-origin teacher, wider/deeper teacher trained from scratch


def _say(_m: str) -> None:
    pass


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


def _built_with() -> dict[str, str]:
    """Library versions and CPU kernels the pairs were trained with: the student's stopping step can move with
    either (two builds with the same versions on other CPUs stopped at steps 300 and 400), so a report can say."""
    import platform

    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "cpu": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def build_pairs(target: Path, recipe: PairRecipe | None = None, log: Callable[[str], None] = _say,
                tick: Callable[[str, int, int, dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train the three models into `target` (student/, teacher/, wide-teacher/, pairs.json); see the module
    docstring. `tick(model, step, total, figures)` reports progress."""
    from minioprd.data import arithmetic_solution
    from minioprd.demo.sft import CEData, train_ce
    from minioprd.builtin.tiny import build_tokenizer

    r = recipe or PairRecipe()
    tok = build_tokenizer()
    tok.padding_side = "left"
    splits = task_splits()
    data = CEData.from_texts(tok, encode_prompts(tok, splits["train"]),
                             [arithmetic_solution(e) for e in splits["train"]])
    val = TestSet(tok, splits["val"])
    target.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"version": PAIR_VERSION, "recipe": asdict(r), "archs": ARCHS, "key": r.key(),
                            "built_with": _built_with()}
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


def load_tokenizer(pairs: Pairs) -> Any:
    """The pairs' shared tokenizer, left-padded for batched generation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pairs.student)
    tok.padding_side = "left"
    return tok
