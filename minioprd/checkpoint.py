"""Checkpoints that a killed run can resume from exactly, and that a crash can never half-write.

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
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from minioprd.errors import MinioprdError
from minioprd.files import atomic_dir, atomic_write_json

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


def _pair_order(key: str) -> tuple[int, int]:
    s, t = key.split(".")[0].split("_")  # "s{a}_t{b}.weight"
    return int(s[1:]), int(t[1:])
