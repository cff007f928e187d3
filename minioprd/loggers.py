"""Optional experiment trackers (`train.report_to`): TensorBoard and Weights & Biases, when installed.

metrics.jsonl stays the record; a tracker gets the same numbers, lists such as `layer_cos` flattened to
`layer_cos/<i>` scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minioprd.errors import MinioprdError

TRACKERS = ("tensorboard", "wandb")


def flatten(record: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, bool) or v is None or k == "step":
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, list):
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(v) if isinstance(x, (int, float))})
    return out


def missing_trackers(names: list[str]) -> list[str]:
    """One problem per tracker in `names` that is not installed (checked before a run loads any model)."""
    import importlib.util

    return [f"train.report_to has {n} but it is not installed: pip install {n}" for n in names
            if n in TRACKERS and importlib.util.find_spec(n) is None]


class Trackers:
    def __init__(self, names: list[str], out: Path, config: dict[str, Any]):
        self.sinks: list[Any] = []
        for name in names:
            if name == "tensorboard":  # installed: `missing_trackers` was checked before the models loaded
                from torch.utils.tensorboard import SummaryWriter

                self.sinks.append(("tensorboard", SummaryWriter(log_dir=str(out / "tensorboard"))))
            elif name == "wandb":
                import wandb

                run = wandb.init(project="minioprd", name=out.name, dir=str(out), config=config)
                self.sinks.append(("wandb", run))
            else:
                raise MinioprdError(f"train.report_to: unknown tracker {name!r}: choose from {', '.join(TRACKERS)}")

    def log(self, record: dict[str, Any]) -> None:
        scalars, step = flatten(record), int(record.get("step", 0))
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                for k, v in scalars.items():
                    sink.add_scalar(k, v, step)
            else:
                sink.log(scalars, step=step)

    def close(self) -> None:
        for kind, sink in self.sinks:
            sink.close() if kind == "tensorboard" else sink.finish()
