"""Data-parallel distillation under Hugging Face accelerate: N processes run the same `distill()` loop.

    accelerate launch -m minioprd distill --recipe R ...       (any accelerate config: nccl on GPUs, gloo on CPU)
    minioprd distill --recipe R --num-processes N               (re-launches itself through `accelerate launch`)

Each process holds its own teacher and LoRA student on its own device (cuda:LOCAL_RANK, or the CPU). A step's
global batch is the configured `rollout.prompts_per_step` prompts x `rollout.n` responses: every process draws
the same prompt indices from the seeded sampler and takes its contiguous share of them. Each response row samples
from its own random stream, derived from (train.seed, step, the row's place in the global batch), so the union
of the processes' rollouts is the set one process would sample. Every micro-batch is weighted by its share of
the global batch's selected tokens (or rows), gradients of every trained tensor (LoRA weights, width
projections, a trained bridge's P_S) are summed across processes, and every process takes the same AdamW step:
N processes train the adapter one process would, up to float rounding (padding widths and summation order
differ). Process 0 alone writes metrics, checkpoints, the adapter and plots; its metrics lines aggregate every
process's figures. A checkpoint holds global state only, so it resumes on any process count.

Not built here: sharded students (FSDP/ZeRO) for a student too big for one card (README, "Several GPUs").
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch

from minioprd.errors import MinioprdError


def launched_world() -> int:
    """Processes in this launch (WORLD_SIZE set by `accelerate launch`/torchrun), 1 when not launched."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass
class Parallel:
    """This process's place in a data-parallel run; the default is the one-process run (every method a no-op)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    state: Any = None  # accelerate.PartialState once the process group is up

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, cpu: bool) -> Parallel:
        """Join the launch's process group through accelerate (gloo on CPU, nccl on GPUs); one process: no group."""
        if launched_world() == 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, state.local_process_index, state)

    def shard(self, k: int) -> tuple[int, int]:
        """[lo, hi): this process's contiguous share of a batch of `k` prompts (sizes differ by at most one)."""
        return self.rank * k // self.world, (self.rank + 1) * k // self.world

    def total(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes."""
        return self.gathered(values).sum(0).tolist()

    def gathered(self, values: list[float]) -> torch.Tensor:
        """(world, len(values)): every process's values, in rank order."""
        if self.world == 1:
            return torch.tensor([values], dtype=torch.float64)
        from accelerate.utils import gather

        t = torch.tensor([values], dtype=torch.float64, device=self._comm_device())
        return gather(t).reshape(self.world, len(values)).cpu()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (e.g. a stop signal reached only some of them)."""
        if self.world == 1:
            return flag
        return bool(self.total([float(flag)])[0] > 0)

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum every trained tensor's gradient over the processes (one all-reduce per dtype). A tensor without a
        gradient on this process (no selected tokens here) contributes zeros, so all processes agree."""
        if self.world == 1:
            return
        from accelerate.utils import reduce

        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault(p.grad.dtype, []).append(p)
        for group in groups.values():
            flat = reduce(torch.cat([p.grad.reshape(-1) for p in group]), reduction="sum")
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Process 0's values everywhere (as DDP does when it wraps a model), so every process starts equal."""
        if self.world == 1:
            return
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in params:
                p.copy_(broadcast(p.detach().clone(), from_process=0))

    def decide(self, fn: Any) -> Any:
        """Run `fn` on process 0 only and hand its result (or its MinioprdError) to every process."""
        if self.world == 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except MinioprdError as e:
                box[0] = ("error", e)
        broadcast_object_list(box, from_process=0)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.state.backend == "nccl" else torch.device("cpu")


SINGLE = Parallel()


def process_device(requested: str) -> str:
    """This process's device for model.device=`requested`: as asked in a one-process run; in a launch of several,
    the card of its local rank (or the CPU)."""
    if launched_world() == 1 or requested == "cpu":
        return requested
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def row_seeds(seed: int, step: int, first_row: int, rows: int) -> list[int]:
    """One sampling seed per response row, from the run seed, the step and the row's place in the step's global
    batch (prompt-major: prompt g's response j is row g*n + j): independent of how the batch is sharded."""
    out = []
    for r in range(first_row, first_row + rows):
        digest = hashlib.blake2b(f"minioprd-rollout:{seed}:{step}:{r}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") >> 1)
    return out


def check_launch(cfg: Any, world: int, requested: int | None = None) -> None:
    """Problems of an N-process run that need no weights: one line each, before anything is written."""
    if requested is not None and world > 1 and requested != world:
        raise MinioprdError(f"--num-processes {requested} but this launch has {world} processes: drop "
                            f"--num-processes under `accelerate launch`, or make the two agree")
    world = world if world > 1 else (requested or 1)
    if world == 1:
        return
    k = cfg.rollout.prompts_per_step
    if world > k:
        raise MinioprdError(f"{world} processes cannot share rollout.prompts_per_step={k} prompts (each needs at "
                            f"least one): use at most {k} processes or raise rollout.prompts_per_step to {world}")
    dev, tdev = cfg.model.device, cfg.model.teacher_device
    if tdev not in ("same", dev):
        raise MinioprdError(f"model.teacher_device={tdev} with {world} processes: each process keeps its teacher on "
                            f"its own card; set model.teacher_device=same (or run one process)")
    if dev.startswith("cuda:"):
        raise MinioprdError(f"model.device={dev} with {world} processes: each process takes the card of its rank; "
                            f"set model.device=cuda (or auto)")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev in ("cuda", "auto") and gpus and world > gpus:
        raise MinioprdError(f"{world} processes but {gpus} CUDA device{'s' if gpus != 1 else ''} visible: each "
                            f"process needs a card of its own; use --num-processes {gpus}")
    if dev == "cuda" and not gpus:
        raise MinioprdError(f"model.device=cuda with {world} processes but no CUDA device is visible: use "
                            f"model.device=cpu (gloo) or run on a machine with {world} cards")


def launch_command(num_processes: int, argv: list[str], port: int | None = None) -> list[str]:
    """`accelerate launch` running `python -m minioprd <argv>` in `num_processes` processes on this machine.

    `--multi_gpu` is accelerate's multi-process mode; with ACCELERATE_USE_CPU=true (set by `relaunch`) it
    starts CPU processes on gloo (accelerate's `--cpu --num_processes 2` was seen to start only one)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port or free_port()), "-m", "minioprd", *argv]


def launch_env(cpu: bool, threads_per_process: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    if threads_per_process:
        env["OMP_NUM_THREADS"] = str(threads_per_process)
    return env


def relaunch(num_processes: int, cpu: bool, argv: list[str]) -> None:
    """Replace this process by `accelerate launch` of the same command (its signals then reach the launcher,
    which forwards them to every process)."""
    cmd = launch_command(num_processes, argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, launch_env(cpu, max(1, (os.cpu_count() or 1) // num_processes) if cpu else None))


def free_port() -> int:
    """A TCP port free right now for the processes' rendezvous (several runs on one machine must not share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
