"""A run's directory: what it holds decides fresh/resume/done; checkpoints that a killed run resumes from exactly
and that a crash can never half-write; the adapter it ends with; Ctrl-C handling.

  open_run      a new dir starts fresh; the same command again (or --resume) continues from the last good
                checkpoint; --force starts over; anything else is refused, so nothing written earlier is lost
  save_adapter  PEFT adapter (or whole model) + tokenizer + projections/bridge + minioprd.json, atomically
  Interrupts    first Ctrl-C/SIGTERM: finish the step, checkpoint, stop; second: exit at once

A checkpoint is a directory `checkpoints/step-NNNNNN/` holding:
  adapter files (PEFT) + projections + tokenizer + minioprd.json   - what `save_adapter` writes
  optimizer.safetensors   - AdamW moments and step counts, one tensor per (parameter index, field)
  rng.safetensors         - torch CPU (and CUDA) generator states, numpy's state
  trainer_state.json      - step, optimizer param groups, scheduler, prompt sampler, counters, python RNG
  checksums.json          - sha256 of every file above, written last
The directory is built under a temporary name, fsynced and renamed (files.atomic_dir), so a checkpoint
either exists whole or not at all; `checksums.json` also catches later corruption. Only safetensors and
JSON are read back: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minioprd import __version__
from minioprd.config import Config
from minioprd.errors import MinioprdError
from minioprd.files import atomic_dir, atomic_write_json, atomic_write_text, read_jsonl

if TYPE_CHECKING:
    from minioprd.prepare import Setup

PREFIX = "step-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = st
    extra: dict[str, Any] = {}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
        extra["numpy"] = [kind, int(pos), int(has_gauss), float(gauss)]
    except ImportError:  # numpy is optional here
        pass
    version, state, gauss = random.getstate()
    extra["python"] = [version, list(state), gauss]
    return tensors, extra


def _set_rng_state(tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    if "numpy" in extra and "numpy_keys" in tensors:
        import numpy as np

        kind, pos, has_gauss, gauss = extra["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype("uint32"), pos, has_gauss, gauss))
    version, state, gauss = extra["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(path: Path, save_weights: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer: dict[str, Any]) -> None:
    """`save_weights(dir)` writes the adapter/projections; everything else is written here."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_weights(tmp)
        opt = optimizer.state_dict()
        tensors = {f"{idx}.{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
                   for idx, st in opt["state"].items() for name, v in st.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_extra = _rng_state()
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        atomic_write_json(tmp / "trainer_state.json", {**trainer, "param_groups": opt["param_groups"],
                                                       "scheduler": sched, "rng": rng_extra})
        sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        atomic_write_json(tmp / "checksums.json", sums)


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    sums_file = path / "checksums.json"
    if not sums_file.is_file():
        return "no checksums.json (written last, so the checkpoint is partial)"
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError:
        return "checksums.json is corrupt"
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum"
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary/partial names are never listed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_valid(run_dir: Path, log: Any = print) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped."""
    for p in reversed(checkpoints(run_dir)):
        problem = verify(p)
        if problem is None:
            return p
        log(f"warning: checkpoint {p} is unusable ({problem}); trying the previous one")
    return None


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for p in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, student: Any, projections: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states in place; returns trainer_state.json."""
    from safetensors.torch import load_file

    problem = verify(path)
    if problem is not None:
        raise MinioprdError(f"checkpoint {path} is unusable ({problem})")
    state = json.loads((path / "trainer_state.json").read_text())
    if (path / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(student, load_file(str(path / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise MinioprdError(f"checkpoint {path} does not fit this student (unexpected keys): resume with the "
                                f"run's own config")
    else:  # full fine-tuning
        weights = {}
        for f in sorted(path.glob("model*.safetensors")):
            weights.update(load_file(str(f)))
        missing, unexpected = student.load_state_dict(weights, strict=False)
        if unexpected:
            raise MinioprdError(f"checkpoint {path} does not fit this student: resume with the run's own config")
    if len(projections):
        tensors = load_file(str(path / "projections.safetensors"))
        for (key, w), proj in zip(sorted(tensors.items(), key=lambda kv: _pair_order(kv[0])), projections):
            proj.weight.data.copy_(w)
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in opt_tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    groups = state["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def resume_run(path: Path, out: Path, s: Setup, optimizer: torch.optim.Optimizer, scheduler: Any,
               sampler: Any, write: bool = True) -> dict[str, Any]:
    """Restore a run from its checkpoint `path` in place (weights, optimizer, schedule, prompt order, RNG) and cut
    metrics.jsonl back to the checkpoint's step (`write`: process 0 of a multi-process run): the lines after it
    were lost with the crash and are recomputed identically. Returns trainer_state.json (`step`, `counters`).

    Everything a checkpoint holds is global (the optimizer and sampler are the same on every process), so it
    resumes on any number of processes."""
    state = load_checkpoint(path, s.student, s.projections, optimizer, scheduler)
    sampler.load_state_dict(state["sampler"])
    if write:
        rows = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= state["step"]]
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return state


# What makes two checkpoints parts of one run: the models, the prompts and their order, the global batch.
RUN_KEYS = ("model.teacher", "model.student", "data.dataset", "data.shuffle", "train.seed",
            "rollout.prompts_per_step", "rollout.n", "rollout.sort_by_length")


def run_identity(cfg: Config) -> dict[str, Any]:
    """The settings a checkpoint must share with the config resuming it (saved in trainer_state.json `run`)."""
    d = cfg.to_dict()
    return {k: d[k.split(".")[0]][k.split(".")[1]] for k in RUN_KEYS}


def check_same_run(path: Path, cfg: Config) -> None:
    """Refuse to resume from a checkpoint written by another run (another batch, seed, data or models)."""
    try:
        saved = json.loads((path / "trainer_state.json").read_text()).get("run")
    except (OSError, json.JSONDecodeError):
        return  # verify() reports an unusable checkpoint
    if not saved:
        return  # written before checkpoints named their run
    now = run_identity(cfg)
    diff = [f"{k} {saved[k]!r} there, {now[k]!r} here" for k in RUN_KEYS if k in saved and saved[k] != now[k]]
    if diff:
        raise MinioprdError(f"checkpoint {path} is from another run ({'; '.join(diff)}): resume with that run's "
                            f"settings, or start over with --force or a new --output-dir")


def _pair_order(key: str) -> tuple[int, int]:
    s, t = key.split(".")[0].split("_")  # "s{a}_t{b}.weight"
    return int(s[1:]), int(t[1:])


def final_dir(s: Setup) -> Path:
    """`adapter/` for a LoRA student, `model/` for a fully fine-tuned one."""
    return Path(s.cfg.train.output_dir) / ("adapter" if s.cfg.lora.r else "model")


def save_adapter(s: Setup, path: Path) -> None:
    """PEFT adapter (or the whole model when lora.r=0) + tokenizer + projections + minioprd.json, atomically."""
    with atomic_dir(path) as tmp:
        save_weights(s, tmp)


def save_weights(s: Setup, tmp: Path) -> None:
    from safetensors.torch import save_file

    from minioprd.models import resolve_model

    cfg = s.cfg
    s.student.save_pretrained(tmp)
    s.tokenizer.save_pretrained(tmp)
    if s.bridge is not None:
        s.bridge.save(tmp / "bridge")
    if len(s.projections):  # width projections, or a jointly trained bridge's P_S (so resume restores them)
        tensors = {f"s{a}_t{b}.weight": p.weight.detach().float().cpu().contiguous()
                   for (a, b), p in zip(s.pairs, s.projections)}
        save_file(tensors, str(tmp / "projections.safetensors"))
    atomic_write_json(tmp / "minioprd.json", {
        "format": 1, "minioprd_version": __version__, "student": cfg.model.student,
        "student_path": resolve_model(cfg.model.student, "student").path,
        "student_quant": cfg.model.student_quant, "teacher": cfg.model.teacher,
        "layer_map": [list(p) for p in s.pairs], "projections": bool(len(s.projections)) and s.bridge is None,
        "bridge": None if s.bridge is None else {"source": cfg.loss.bridge, "rank": s.bridge.rank,
                                                 "trainable": cfg.loss.bridge_trainable, "dir": "bridge"},
        "same_tokenizer": s.cross is None,
        "loss": cfg.loss.kind, "convention": cfg.loss.convention, "full_finetune": cfg.lora.r == 0,
    })


def open_run(out: Path, cfg: Config, force: bool, resume: bool, log: Any) -> tuple[Path | None, bool]:
    """Decide what to do with an output dir: (checkpoint to resume from, already finished?).

    A new dir starts fresh. A dir holding a run is resumed from its last good checkpoint when `resume` is
    asked, or when the same command (identical config.yaml) is run again; `force` starts over; anything
    else is refused, so nothing written earlier is lost.
    """
    for place in (out, *out.parents):  # the nearest existing path must be a directory we can write into
        if place.exists():
            if not place.is_dir():
                raise MinioprdError(f"--output-dir {str(out)!r}: {str(place)!r} is a file, not a directory: "
                                    f"pass a directory path (train.output_dir)")
            break
    held = (out / "metrics.jsonl").exists() or (out / "adapter").exists() or (out / "model").exists() \
        or (out / "checkpoints").exists()
    if not held:
        if resume:
            raise MinioprdError(f"nothing to resume in {str(out)!r}: it holds no run (start it without --resume)")
        return None, False
    if force:  # start over; the old adapter/ stays until the new one replaces it atomically
        for name in ("metrics.jsonl", "metrics.png", "summary.json", "objective.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return None, False
    from minioprd.objective import same_config

    same = (out / "config.yaml").is_file() and same_config((out / "config.yaml").read_text(), cfg, out)
    if not (resume or same):
        raise MinioprdError(f"output dir {str(out)!r} already holds a run with another config: pass a new "
                            f"--output-dir, --resume {out} to continue it, or --force to overwrite it")
    if (out / "summary.json").is_file() and same:
        return None, True
    ckpt = latest_valid(out, log)
    if ckpt is None:
        raise MinioprdError(f"the run in {str(out)!r} has no usable checkpoint to resume from (set "
                            f"train.save_every to write them): pass --force to start it over")
    check_same_run(ckpt, cfg)
    return ckpt, False


class Interrupts:
    """First Ctrl-C/SIGTERM: finish the current step, checkpoint, stop. Second: exit at once.

    Every file is written atomically, so even the immediate exit leaves the previous checkpoint whole.
    """

    # A signal within this many seconds of the first is the same request: Ctrl-C reaches every process of a
    # multi-process run from the terminal and again from the launcher, which forwards what it got.
    REPEAT_S = 2.0

    def __init__(self, log: Any):
        self.requested, self.log, self.saved, self.at = None, log, {}, 0.0

    def __enter__(self) -> "Interrupts":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. not in a notebook worker)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        import time

        if self.requested is not None:
            if time.monotonic() - self.at < self.REPEAT_S:
                return
            os._exit(130)  # second signal: no cleanup; files on disk are whole by construction
        self.requested, self.at = signal.Signals(signum).name, time.monotonic()
        self.log(f"{self.requested}: finishing this step, then saving a checkpoint (press again to quit now)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
