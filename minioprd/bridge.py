"""OPRD-Bridge (paper §3, Eqs. 11-15): a frozen low-rank subspace shared by a student and a teacher of
different widths, depths or tokenizers.

    minioprd bridge --teacher Qwen2.5-7B --student Qwen2.5-0.5B --dataset prompts.jsonl -o bridges/7b-0.5b

Stage 0 `collect`   the student (no adapter) answers a sample of prompts on-policy (default 2,000, one
                    response each); both models read the responses (the teacher in its own tokens through
                    `cross_tokenizer.CrossTokenizer` when the tokenizers differ); the states of every proportionally
                    mapped layer pair (Eq. 11, `layers.layer_map("all", ...)`) at the response positions
                    (`layers.state_window` convention) are subsampled to <= max_rows rows in all and written
                    batch by batch as fp16 safetensors shards, so a 7B teacher's states never sit in memory.
Stage 1 `fit`       per teacher layer, PCA of the centred teacher rows of the training sequences (Eq. 12):
                    P_T = the top-r eigenvectors (r, d_T) of their covariance (`torch.linalg.eigh`), and μ_T;
                    per layer pair, a bias-free Linear(d_S -> r) P_S trained with MSE to (h_T − μ_T) P_Tᵀ (Eq. 13),
                    AdamW (lr 1e-4, weight decay 0), a 90/10 split by sequence, keeping the epoch with the best
                    validation cosine (20 epochs). P_S starts from the closed-form least-squares fit of the same
                    MSE (`init="lstsq"`): from nn.Linear's random start, ~1,000 steps at lr 1e-4 over 16K rows
                    stay far from converged (`init="random"` is the authors' code, which saw ~100x more rows).
                    Ranks can be swept (`--ranks 4,8,16`; the paper: r≈8, 4 across tokenizers).
Stage 2 (distill)   `load_bridge` refuses a bridge made for other models or layer pairs, and gives the frozen P_S
                    as `projections` for `losses.representation_loss` and `teacher_transform` for the targets:

    bridge = load_bridge("bridges/7b-0.5b", student_id, teacher_id, pairs, device=device)
    loss, per_layer = representation_loss(states, bridge.teacher_transform(targets), mask,
                                          kind="normalized_mse", projections=bridge.student_projections)

i.e. the L2-normalised MSE between P_S h_S and P_T (h_T − μ_T) in r dimensions (Eqs. 14-15). Training P_S
jointly (`trainable=True`) is kept as an option; the paper reports it worse.

Files: `bridge.safetensors` (per pair `s{a}_t{b}.P_S` (r, d_S), `.P_T` (r, d_T), `.mu_T` (d_T,), fp32) and
`bridge.json` (rank, layer pairs, model ids and shapes, tokenizers same or not, metrics, version); no pickles.
A rank sweep also writes `rank-{r}/` beside them for every other rank.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minioprd import __version__
from minioprd.errors import MinioprdError
from minioprd.files import atomic_write_bytes, atomic_write_json
from minioprd.projections import least_squares

FORMAT = 1
WEIGHTS, META = "bridge.safetensors", "bridge.json"
COLLECT = "collect.json"
FP16_MAX = 60000.0  # rows with larger magnitudes are stored as bf16 (fp16 tops out at 65504)
INITS = ("lstsq", "random")

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------- identities


def model_key(name: str) -> str:
    """What identifies a model argument: the builtin name, a local directory's absolute path, or the hub id
    (known short names resolved: `Qwen2.5-7B` and `Qwen/Qwen2.5-7B` are the same model)."""
    if name.startswith("builtin:"):
        return name
    p = Path(name).expanduser()
    if p.is_dir():
        return str(p.resolve())
    from minioprd.models import KNOWN_MODELS

    return KNOWN_MODELS.get(name.lower(), name)


def _pair_key(a: int, b: int) -> str:
    return f"s{a}_t{b}"


# --------------------------------------------------------------------------------------------- stage 0


def _compact(x: Tensor) -> Tensor:
    """fp16 rows, or bf16 when some value would overflow fp16 (massive activations)."""
    x = x.detach().float().cpu()
    big = x.abs().max() if x.numel() else torch.tensor(0.0)
    return (x.to(torch.float16) if bool(big < FP16_MAX) else x.to(torch.bfloat16)).contiguous()


@torch.no_grad()
def collect(student: nn.Module, teacher: nn.Module, student_tok: Any, prompts: Sequence[Sequence[int]],
            pairs: Sequence[tuple[int, int]], states_dir: str | Path, *, cross: Any = None,
            max_new_tokens: int = 512, batch_size: int = 16, max_rows: int = 16384, temperature: float = 1.0,
            top_p: float = 1.0, convention: str = "predict", seed: int = 0, meta: dict[str, Any] | None = None,
            log: Log | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Stage 0: on-policy responses to `prompts` (student ids), states of both models on them, to disk.

    One response per prompt. Each batch keeps a uniform sample of its aligned response positions, at most
    ceil(rows still wanted / batches left), so the total is <= `max_rows` and short batches leave their
    share to later ones. Shard `shard-NNNNN.safetensors` holds, row-aligned, `s{a}` (n, d_S) per student
    layer, `t{b}` (n, d_T) per teacher layer and `seq` (n,) the response each row comes from. `cross`
    (`cross_tokenizer.CrossTokenizer`) lets a teacher with another tokenizer read the responses as text.
    Returns the summary also written to `collect.json`.
    """
    from minioprd.capture import capture_hidden
    from minioprd.layers import state_window
    from minioprd.rollout import rollout

    if max_rows < 2:
        raise MinioprdError(f"max_rows must be >= 2, got {max_rows}")
    if not prompts:
        raise MinioprdError("no prompts to collect states on")
    out = Path(states_dir)
    out.mkdir(parents=True, exist_ok=True)
    s_layers = sorted({a for a, _ in pairs})
    t_layers = sorted({b for _, b in pairs})
    t_dev = next(teacher.parameters()).device
    student.eval()
    gen = torch.Generator().manual_seed(seed)
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    kept = tokens = aligned = exact = eos = 0
    shards: list[str] = []
    t_start = time.time()
    for k, idx in enumerate(batches):
        torch.manual_seed(seed * 1_000_003 + k)
        ro = rollout(student, student_tok, [list(prompts[i]) for i in idx], n=1, temperature=temperature,
                     top_p=top_p, max_new_tokens=max_new_tokens)
        win = state_window(ro.prompt_len, ro.response_mask, convention)
        s_got = capture_hidden(student, ro.input_ids, ro.attention_mask, ro.position_ids(), s_layers,
                               win.start, win.stop)
        if cross is None:
            t_got = capture_hidden(teacher, ro.input_ids.to(t_dev), ro.attention_mask.to(t_dev),
                                   ro.position_ids().to(t_dev), t_layers, win.start, win.stop)
            mask = win.mask
        else:
            ti = cross.align(ro)
            a_frac, e_frac = ti.coverage(ro.response_mask)
            aligned += a_frac * int(ro.response_mask.sum())
            exact += e_frac * int(ro.response_mask.sum())
            t_got, mask = cross.teacher_states(teacher, ro, t_layers, win, convention, inputs=ti)
        n_valid = int(ro.response_mask.sum())
        tokens += n_valid
        eos += int((ro.response_mask.sum(1) < ro.response_mask.shape[1]).sum())
        where = mask.nonzero()  # (N, 2) rows/columns of the window
        quota = math.ceil((max_rows - kept) / (len(batches) - k))
        if where.shape[0] > quota:
            where = where[torch.randperm(where.shape[0], generator=gen)[:quota].sort().values]
        if where.shape[0]:
            r_, c_ = where[:, 0], where[:, 1]
            tensors = {f"s{a}": _compact(h[r_.to(h.device), c_.to(h.device)]) for a, h in zip(s_layers, s_got)}
            tensors.update({f"t{b}": _compact(h[r_.to(h.device), c_.to(h.device)]) for b, h in zip(t_layers, t_got)})
            tensors["seq"] = (r_ + idx[0]).to(torch.int32).contiguous()
            from safetensors.torch import save

            name = f"shard-{k:05d}.safetensors"
            atomic_write_bytes(out / name, save(tensors))
            shards.append(name)
            kept += where.shape[0]
        if progress is not None:
            progress(len(idx))
        elif log is not None and len(batches) >= 10 and (k + 1) % (len(batches) // 10) == 0:
            log(f"  stage 0: {k + 1}/{len(batches)} batches, {tokens} tokens, {kept} rows, "
                f"{time.time() - t_start:.0f}s")
        del s_got, t_got
    if kept < 2:
        raise MinioprdError(f"only {kept} response positions were collected: use more prompts (--prompts) or "
                            f"longer responses (--max-new-tokens)")
    summary = {
        "format": FORMAT, "minioprd_version": __version__, **(meta or {}),
        "pairs": [list(p) for p in pairs], "convention": convention, "prompts": len(prompts),
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
        "rows": kept, "tokens": tokens, "response_len": tokens / len(prompts), "eos_frac": eos / len(prompts),
        "same_tokenizer": cross is None, "shards": shards, "seconds": time.time() - t_start,
    }
    if cross is not None:
        summary["aligned_frac"] = aligned / max(1, tokens)
        summary["exact_frac"] = exact / max(1, tokens)
        summary["align_mode"] = cross.mode
    atomic_write_json(out / COLLECT, summary)
    if log is not None:
        log(f"stage 0: {len(prompts)} responses, {tokens} tokens (mean {summary['response_len']:.0f}), "
            f"{kept} rows kept per layer" + (f"; {100 * summary['aligned_frac']:.1f}% of tokens aligned to the "
                                              f"teacher ({100 * summary['exact_frac']:.1f}% exactly)"
                                              if cross is not None else ""))
    return summary


def read_collection(states_dir: str | Path) -> dict[str, Any]:
    p = Path(states_dir) / COLLECT
    if not p.is_file():
        raise MinioprdError(f"{str(states_dir)!r} holds no collected states ({COLLECT} is missing): run Stage 0 "
                            f"first (`minioprd bridge` without --states)")
    return json.loads(p.read_text())


def load_rows(states_dir: str | Path, key: str, info: dict[str, Any] | None = None) -> Tensor:
    """One tensor (`s{a}`, `t{b}` or `seq`) over all shards, concatenated; float32 for states."""
    from safetensors import safe_open

    info = info or read_collection(states_dir)
    parts = []
    for name in info["shards"]:
        with safe_open(str(Path(states_dir) / name), framework="pt") as f:
            parts.append(f.get_tensor(key))
    x = torch.cat(parts)
    return x if key == "seq" else x.float()


# --------------------------------------------------------------------------------------------- stage 1


def pca(x: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """Top-`rank` principal directions of the rows of `x` (N, d): (P (rank, d), μ (d,), eigenvalues (rank,),
    total variance). Eigen-decomposition of the centred covariance in float64 on x's device; rows of P are
    orthonormal, by decreasing variance, each signed so that its largest-magnitude entry is positive."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise MinioprdError(f"PCA needs at least 2 rows of shape (N, d), got {tuple(x.shape)}")
    if not 1 <= rank <= x.shape[1]:
        raise MinioprdError(f"rank must be in 1..{x.shape[1]} (the teacher width), got {rank}")
    x64 = x.double()
    mu = x64.mean(0)
    xc = x64 - mu
    cov = xc.T @ xc / (x.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = evecs[:, -rank:].flip(1).T  # (rank, d), decreasing variance
    sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
    top = top * torch.where(sign == 0, torch.ones_like(sign), sign)
    return top.float(), mu.float(), evals[-rank:].flip(0).float(), float(evals.clamp(min=0).sum())


@dataclass
class ProjectionFit:
    weight: Tensor  # (r, d_S): P_S of the best-validation epoch
    val_cos: float  # mean cosine(P_S h_S, P_T (h_T − μ_T)) over validation rows, best epoch
    best_epoch: int  # 0 = the initial weights were never beaten
    history: list[float] = field(default_factory=list)  # validation cosine after each epoch


def _val_cos(proj: nn.Module, s: Tensor, z: Tensor, chunk: int = 8192) -> float:
    with torch.no_grad():
        total = sum(float(F.cosine_similarity(proj(s[i:i + chunk]), z[i:i + chunk], dim=-1, eps=1e-8).sum())
                    for i in range(0, s.shape[0], chunk))
    return total / max(1, s.shape[0])


def train_projection(s_train: Tensor, z_train: Tensor, s_val: Tensor, z_val: Tensor, *, epochs: int = 20,
                     lr: float = 1e-4, batch_size: int = 256, seed: int = 0, init: str = "lstsq") -> ProjectionFit:
    """Eq. 13: a bias-free Linear(d_S -> r) fitted by MSE to the projected teacher rows, AdamW (weight decay 0),
    shuffled mini-batches, the epoch with the best validation cosine kept (epoch 0: the initial weights).

    init="random" (nn.Linear's default) is the authors' code; their ~9,000 steps over millions of token rows
    converge, but ~1,000 steps over 16K rows at lr 1e-4 do not (val cos 0.4-0.6 on synthetic linear data).
    init="lstsq" (default) starts from the closed-form minimiser of the same MSE (`least_squares`, a tiny
    ridge), which the AdamW epochs then refine for validation cosine.
    """
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise MinioprdError(f"need epochs >= 0, batch size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    if init not in INITS:
        raise MinioprdError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    d_s, r = s_train.shape[1], z_train.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = nn.Linear(d_s, r, bias=False)
    proj = proj.to(s_train.device)
    if init == "lstsq":
        with torch.no_grad():
            proj.weight.copy_(least_squares(s_train, z_train))
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    best, best_w, best_epoch, history = _val_cos(proj, s_val, z_val), proj.weight.detach().clone(), 0, []
    n = s_train.shape[0]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=gen).to(s_train.device)
        for i in range(0, n, batch_size):
            rows = order[i:i + batch_size]
            loss = F.mse_loss(proj(s_train[rows]), z_train[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        cos = _val_cos(proj, s_val, z_val)
        history.append(cos)
        if cos > best:
            best, best_w, best_epoch = cos, proj.weight.detach().clone(), epoch
    return ProjectionFit(best_w.cpu(), best, best_epoch, history)


@dataclass
class PairFit:
    pair: tuple[int, int]
    P_S: Tensor  # (r, d_S)
    P_T: Tensor  # (r, d_T)
    mu_T: Tensor  # (d_T,)
    val_cos: float
    best_epoch: int
    explained: float  # fraction of the teacher layer's variance in the top-r directions


def _split(seq: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Train/validation row indices, split by response (rows of one response stay together) when there are
    at least two responses, else by row."""
    uniq = sorted(set(seq.tolist()))
    rng = random.Random(f"minioprd-bridge:{seed}")
    if len(uniq) >= 2:
        rng.shuffle(uniq)
        n_val = min(len(uniq) - 1, max(1, round(val_fraction * len(uniq))))
        val = torch.isin(seq, torch.tensor(uniq[:n_val], dtype=seq.dtype))
    else:
        order = list(range(seq.shape[0]))
        rng.shuffle(order)
        val = torch.zeros(seq.shape[0], dtype=torch.bool)
        val[order[:max(1, round(val_fraction * len(order)))]] = True
    return (~val).nonzero().flatten(), val.nonzero().flatten()


def fit(states_dir: str | Path, ranks: Sequence[int] = (8,), *, epochs: int = 20, lr: float = 1e-4,
        batch_size: int = 256, val_fraction: float = 0.1, max_rows: int = 16384, seed: int = 0,
        init: str = "lstsq", device: str | torch.device = "cpu",
        log: Log | None = None) -> tuple[dict[int, list[PairFit]], dict[str, Any]]:
    """Stage 1 on the rows of `states_dir`: PCA per teacher layer, then P_S per pair and rank.

    Returns ({rank: [PairFit per pair]}, {"train_rows", "val_rows"}). One layer's rows are in memory at a time.
    """
    info = read_collection(states_dir)
    pairs = [tuple(p) for p in info["pairs"]]
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 1:
        raise MinioprdError(f"ranks must be positive integers, got {ranks}")
    if not 0 < val_fraction < 1:
        raise MinioprdError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    device = torch.device(device)
    seq = load_rows(states_dir, "seq", info)
    keep = torch.arange(seq.shape[0])
    if seq.shape[0] > max_rows:
        keep = torch.randperm(seq.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
    train, val = _split(seq[keep], val_fraction, seed)
    if train.numel() < 2:
        raise MinioprdError(f"only {train.numel()} training rows: collect more states (--prompts, --max-new-tokens)")
    targets: dict[int, tuple[Tensor, Tensor, Tensor, float]] = {}  # teacher layer -> (Z all rows, P, mu, explained)
    for b in sorted({b for _, b in pairs}):
        t = load_rows(states_dir, f"t{b}", info)[keep].to(device)
        if ranks[-1] > t.shape[1]:
            raise MinioprdError(f"rank {ranks[-1]} exceeds the teacher width {t.shape[1]}")
        P, mu, evals, total = pca(t[train.to(device)], ranks[-1])
        z = (t - mu) @ P.T  # (N, r_max)
        explained = (evals.cumsum(0) / max(total, 1e-30)).cpu()
        targets[b] = (z, P.cpu(), mu.cpu(), explained)
        del t
    fits: dict[int, list[PairFit]] = {r: [] for r in ranks}
    tr, va = train.to(device), val.to(device)
    for i, (a, b) in enumerate(pairs):
        s = load_rows(states_dir, f"s{a}", info)[keep].to(device)
        z, P, mu, explained = targets[b]
        for r in ranks:
            got = train_projection(s[tr], z[tr, :r], s[va], z[va, :r], epochs=epochs, lr=lr,
                                   batch_size=batch_size, seed=seed + i, init=init)
            fits[r].append(PairFit((a, b), got.weight, P[:r].clone(), mu.clone(), got.val_cos, got.best_epoch,
                                   float(explained[r - 1])))
        if log is not None:
            log(f"  pair {a}->{b}: val cos " + ", ".join(f"r={r} {fits[r][-1].val_cos:.4f}" for r in ranks))
        del s
    return fits, {"train_rows": int(train.numel()), "val_rows": int(val.numel())}


# --------------------------------------------------------------------------------------------- files


def save_bridge(path: str | Path, fits: Sequence[PairFit], meta: dict[str, Any]) -> Path:
    """Write `bridge.safetensors` and then `bridge.json` (a directory is a bridge once its json exists)."""
    from safetensors.torch import save

    path = Path(path)
    if not fits:
        raise MinioprdError("a bridge needs at least one layer pair")
    tensors = {}
    for f in fits:
        key = _pair_key(*f.pair)
        tensors[f"{key}.P_S"] = f.P_S.detach().float().cpu().contiguous()
        tensors[f"{key}.P_T"] = f.P_T.detach().float().cpu().contiguous()
        tensors[f"{key}.mu_T"] = f.mu_T.detach().float().cpu().contiguous()
    rank = int(fits[0].P_S.shape[0])
    record = {
        **meta, "format": FORMAT, "kind": "oprd-bridge", "minioprd_version": __version__, "rank": rank,
        "layer_pairs": [list(f.pair) for f in fits],
        "student_hidden": int(fits[0].P_S.shape[1]), "teacher_hidden": int(fits[0].P_T.shape[1]),
        "metrics": {**meta.get("metrics", {}),
                    "val_cos": [round(f.val_cos, 6) for f in fits],
                    "best_epoch": [f.best_epoch for f in fits],
                    "explained_var": [round(f.explained, 6) for f in fits],
                    "mean_val_cos": round(sum(f.val_cos for f in fits) / len(fits), 6)},
    }
    atomic_write_bytes(path / WEIGHTS, save(tensors, metadata={"format": str(FORMAT), "rank": str(rank)}))
    atomic_write_json(path / META, record)
    return path


class Bridge(nn.Module):
    """A fitted bridge for some layer pairs: frozen student projections and the teacher's PCA maps."""

    def __init__(self, pairs: Sequence[tuple[int, int]], P_S: Sequence[Tensor], P_T: Sequence[Tensor],
                 mu_T: Sequence[Tensor], meta: dict[str, Any], trainable: bool = False):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.meta = dict(meta)
        self.rank = int(P_S[0].shape[0])
        self.student_projections = nn.ModuleList()
        for w in P_S:
            proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                proj.weight.copy_(w)
            proj.requires_grad_(trainable)
            self.student_projections.append(proj)
        for i, (p, m) in enumerate(zip(P_T, mu_T)):
            self.register_buffer(f"P_T_{i}", p.float().clone())
            self.register_buffer(f"mu_T_{i}", m.float().clone())

    def teacher_transform(self, targets: Sequence[Tensor]) -> list[Tensor]:
        """[(B, W, d_T) per pair] -> [(B, W, r)]: (h_T − μ_T) P_Tᵀ in float32, no gradient."""
        if len(targets) != len(self.pairs):
            raise ValueError(f"got {len(targets)} teacher layers for a bridge of {len(self.pairs)} pairs")
        out = []
        for i, t in enumerate(targets):
            P, mu = getattr(self, f"P_T_{i}"), getattr(self, f"mu_T_{i}")
            with torch.no_grad():
                out.append((t.detach().to(P.device, torch.float32) - mu) @ P.T)
        return out

    def fits(self) -> list[PairFit]:
        """The pairs as `PairFit`s (current P_S; Stage-1 figures from the metadata)."""
        metrics = self.meta.get("metrics", {})
        saved = [tuple(p) for p in self.meta.get("layer_pairs", [])]

        def figure(name: str, p: tuple[int, int], default: Any) -> Any:
            values = metrics.get(name, [])
            return values[saved.index(p)] if p in saved and saved.index(p) < len(values) else default

        return [PairFit(p, proj.weight.detach().float().cpu(), getattr(self, f"P_T_{i}").cpu(),
                        getattr(self, f"mu_T_{i}").cpu(), float(figure("val_cos", p, 0.0)),
                        int(figure("best_epoch", p, 0)), float(figure("explained_var", p, 0.0)))
                for i, (p, proj) in enumerate(zip(self.pairs, self.student_projections))]

    def save(self, path: str | Path) -> Path:
        """Write this bridge (e.g. with jointly trained P_S, into a run's adapter) to `path`, with its metadata."""
        return save_bridge(path, self.fits(), {k: v for k, v in self.meta.items() if k != "layer_pairs"})


def _same_model(saved_name: str | None, saved_key: str | None, given: str) -> bool:
    if saved_name is None:
        return False
    return given == saved_name or model_key(given) == (saved_key or model_key(saved_name))


def load_bridge(path: str | Path, student: str, teacher: str, pairs: Sequence[tuple[int, int]], *,
                student_hidden: int | None = None, teacher_hidden: int | None = None,
                device: str | torch.device = "cpu", trainable: bool = False) -> Bridge:
    """The bridge in `path` for these models and `pairs` (a subset of the bridge's pairs, in this order).

    Refuses (MinioprdError) a bridge fitted for another student or teacher (model ids as `model_key` resolves
    them, and widths when given) or lacking one of `pairs`. P_S is frozen unless `trainable`.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        hint = " (pass the directory `minioprd bridge -o` wrote)" if path.is_file() else ""
        raise MinioprdError(f"{str(path)!r} is not a bridge directory: {META} and {WEIGHTS} are needed{hint}")
    meta = json.loads((path / META).read_text())
    if meta.get("kind") != "oprd-bridge" or int(meta.get("format", 0)) > FORMAT:
        raise MinioprdError(f"{str(path / META)!r} is not a bridge this minioprd can read (format "
                            f"{meta.get('format')!r}); refit it with `minioprd bridge`")
    for role, given, saved, key in (("student", student, meta.get("student"), meta.get("student_key")),
                                    ("teacher", teacher, meta.get("teacher"), meta.get("teacher_key"))):
        if not _same_model(saved, key, given):
            raise MinioprdError(f"bridge {str(path)!r} was fitted for {role} {saved!r}, not {given!r}: fit one for "
                                f"these models (`minioprd bridge --teacher {teacher} --student {student} ...`)")
    for role, given, saved in (("student", student_hidden, meta.get("student_hidden")),
                               ("teacher", teacher_hidden, meta.get("teacher_hidden"))):
        if given is not None and saved != given:
            raise MinioprdError(f"bridge {str(path)!r} expects a {role} {saved} wide, but the {role} is {given} "
                                f"wide: it was fitted for another model; refit it")
    have = [tuple(p) for p in meta["layer_pairs"]]
    want = [tuple(int(x) for x in p) for p in pairs]
    missing = [p for p in want if p not in have]
    if missing or not want:
        raise MinioprdError(f"bridge {str(path)!r} has layer pairs {_fmt_pairs(have)} but this run maps "
                            f"{_fmt_pairs(want)} ({_fmt_pairs(missing)} missing): use the bridge's layers "
                            f"(loss.layers) or refit it with these")
    tensors = load_file(str(path / WEIGHTS))
    try:
        P_S = [tensors[f"{_pair_key(*p)}.P_S"] for p in want]
        P_T = [tensors[f"{_pair_key(*p)}.P_T"] for p in want]
        mu_T = [tensors[f"{_pair_key(*p)}.mu_T"] for p in want]
    except KeyError as e:
        raise MinioprdError(f"{str(path / WEIGHTS)!r} lacks tensor {e.args[0]!r}: the bridge is damaged; refit it") \
            from None
    r = P_S[0].shape[0]
    bad = [p for p, s, t, m in zip(want, P_S, P_T, mu_T)
           if s.shape[0] != r or t.shape != (r, m.shape[0]) or s.shape[1] != meta["student_hidden"]]
    if bad:
        raise MinioprdError(f"{str(path / WEIGHTS)!r} has inconsistent shapes for pairs {_fmt_pairs(bad)}; refit it")
    return Bridge(want, P_S, P_T, mu_T, meta, trainable=trainable).to(torch.device(device))


def _fmt_pairs(pairs: Sequence[tuple[int, int]]) -> str:
    return "[" + ", ".join(f"{a}->{b}" for a, b in pairs) + "]"


# --------------------------------------------------------------------------------------------- pipeline


def parse_ranks(text: str | None, rank: int) -> list[int]:
    """`--ranks 4,8,16` (the saved `--rank` always included)."""
    ranks = {rank}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise MinioprdError(f"--ranks must be positive integers separated by commas (4,8,16), got {text!r}")
        ranks.add(int(part))
    return sorted(ranks)


def build_bridge(teacher: str | None = None, student: str | None = None, dataset: str | None = None,
                 output: str | Path = "", *, config: Any = None, log: Log | None = None,
                 **settings: Any) -> dict[str, Any]:
    """`minioprd bridge`: Stage 0 (unless `states` names collected states) and Stage 1; writes the bridge
    for `rank` in `output`, and one in `output/rank-{r}` for every other rank of `ranks`. Returns a summary.

    The settings are those of `config.BridgeCommandConfig` (help and defaults there), given as `config` or as
    keyword arguments; every problem with them is reported at once before anything loads."""
    import os

    from minioprd.config import BridgeCommandConfig
    from minioprd.models import pick_device, pick_dtype

    if isinstance(settings.get("ranks"), (list, tuple)):
        settings["ranks"] = ",".join(map(str, settings["ranks"]))
    for key in ("states",):
        if settings.get(key) is not None:
            settings[key] = str(settings[key])
    c = config or BridgeCommandConfig(teacher=teacher, student=student, dataset=dataset, output=str(output),
                                      **settings)
    c.check()
    log = log or (lambda m: None)
    out = Path(c.output)
    if (out / META).exists() and not c.force:
        raise MinioprdError(f"{str(out)!r} already holds a bridge: pass another --output, or --force to replace it")
    rank_list = parse_ranks(c.ranks, c.rank)
    teacher, student, dataset, states, rank = c.teacher, c.student, c.dataset, c.states, c.rank
    epochs, lr, init, max_rows, seed, keep_states = c.epochs, c.lr, c.init, c.max_rows, c.seed, c.keep_states
    torch.set_num_threads(c.threads or max(1, os.cpu_count() or 1))
    try:
        dev = pick_device(c.device)
    except RuntimeError:
        raise MinioprdError(f"unknown device {c.device!r}: use auto, cpu, cuda or cuda:N") from None
    torch_dtype = pick_dtype(c.dtype, dev)

    if states is not None:
        states_dir = Path(states)
        info = read_collection(states_dir)
        for role, given in (("student", student), ("teacher", teacher)):
            if given is not None and not _same_model(info.get(role), info.get(f"{role}_key"), given):
                raise MinioprdError(f"states in {str(states_dir)!r} were collected for {role} {info.get(role)!r}, "
                                    f"not {given!r}")
        log(f"stage 0: reusing {info['rows']} rows from {states_dir}")
    else:
        if not (teacher and student and dataset):
            raise MinioprdError("pass --teacher, --student and --dataset (or --states DIR to refit collected states)")
        states_dir = out / "states"
        info = _stage0(teacher, student, dataset, states_dir, dev=dev, dtype=torch_dtype, prompts=c.prompts,
                       max_new_tokens=c.max_new_tokens, max_rows=max_rows, batch_size=c.batch_size, layers=c.layers,
                       convention=c.convention, align_mode=c.align_mode, teacher_quant=c.teacher_quant,
                       split=c.split, field=c.field, prompt_template=c.prompt_template,
                       prompt_suffix=c.prompt_suffix, chat_template=c.chat_template,
                       max_prompt_tokens=c.max_prompt_tokens, temperature=c.temperature, top_p=c.top_p, seed=seed,
                       log=log)

    log(f"stage 1: PCA per teacher layer, P_S per pair; ranks {rank_list}, {init} start + {epochs} AdamW "
        f"epochs at lr {lr}")
    fits, split_rows = fit(states_dir, rank_list, epochs=epochs, lr=lr, batch_size=c.fit_batch_size,
                           max_rows=max_rows, seed=seed, init=init, device=dev, log=log)
    sweep = {str(r): {"mean_val_cos": round(sum(f.val_cos for f in fs) / len(fs), 6),
                      "mean_explained_var": round(sum(f.explained for f in fs) / len(fs), 6)}
             for r, fs in fits.items()}
    keys = ("student", "student_key", "student_path", "teacher", "teacher_key", "teacher_path", "student_layers",
            "teacher_layers", "same_tokenizer", "convention", "align_mode", "prompts", "max_new_tokens",
            "dataset", "teacher_quant")
    meta = {k: info[k] for k in keys if k in info}
    meta["fit"] = {"init": init, "epochs": epochs, "lr": lr, "weight_decay": 0.0, "batch_size": c.fit_batch_size,
                   "val_fraction": 0.1, "seed": seed, **split_rows, "max_rows": max_rows}
    meta["collect"] = {k: info[k] for k in ("rows", "tokens", "response_len", "eos_frac", "aligned_frac",
                                            "exact_frac") if k in info}
    meta["metrics"] = {"sweep": sweep}
    out.mkdir(parents=True, exist_ok=True)
    save_bridge(out, fits[rank], meta)
    for r, fs in fits.items():
        if r != rank:
            save_bridge(out / f"rank-{r}", fs, meta)
    if states is None and not keep_states:
        shutil.rmtree(states_dir, ignore_errors=True)
    best = max(sweep, key=lambda r: sweep[r]["mean_val_cos"])
    return {"output": str(out), "rank": rank, "pairs": [list(f.pair) for f in fits[rank]],
            "val_cos": [f.val_cos for f in fits[rank]], "best_epoch": [f.best_epoch for f in fits[rank]],
            "explained_var": [f.explained for f in fits[rank]], "sweep": sweep, "best_rank": int(best),
            "collect": meta["collect"], "same_tokenizer": info.get("same_tokenizer", True),
            "other_ranks": [str(out / f"rank-{r}") for r in fits if r != rank]}


def _stage0(teacher: str, student: str, dataset: str, states_dir: Path, *, dev: torch.device, dtype: torch.dtype,
            prompts: int, max_new_tokens: int, max_rows: int, batch_size: int, layers: str, convention: str,
            align_mode: str, teacher_quant: str, split: str, field: str, prompt_template: str, prompt_suffix: str,
            chat_template: str, max_prompt_tokens: int, temperature: float, top_p: float, seed: int,
            log: Log) -> dict[str, Any]:
    from minioprd.cross_tokenizer import CrossTokenizer, prompt_table, same_tokenizer, teacher_prompts
    from minioprd.capture import num_layers
    from minioprd.data import load_examples, render_prompts, tokenize_prompts
    from minioprd.layers import layer_map
    from minioprd.models import _from_pretrained, check_tokenizers, load_teacher, load_tokenizer, resolve_model
    from minioprd.rollout import eos_ids

    t_res, s_res = resolve_model(teacher, "teacher"), resolve_model(student, "student")
    log(t_res.note)
    log(s_res.note)
    s_tok, t_tok = load_tokenizer(s_res, "student"), load_tokenizer(t_res, "teacher")
    examples = load_examples(dataset, split=split, field=field, answer_field="none")
    texts = render_prompts(s_tok, examples, template=prompt_template, suffix=prompt_suffix,
                           chat_template=chat_template)
    ids, kept, skipped = tokenize_prompts(s_tok, texts, max_prompt_tokens, "skip")
    order = list(range(len(ids)))
    random.Random(f"minioprd-bridge-prompts:{seed}").shuffle(order)
    order = sorted(order[:prompts])
    s_prompts = [ids[i] for i in order]
    log(f"prompts: {len(s_prompts)} of {len(ids)} from {dataset}" + (f" ({skipped} longer than "
                                                                      f"{max_prompt_tokens} tokens skipped)"
                                                                      if skipped else ""))
    teacher_model = load_teacher(t_res, teacher_quant, dev, dtype=dtype)  # on a GPU: fp16 on a T4, as distill
    same = same_tokenizer(s_tok, t_tok)
    cross = None
    if same:
        check_tokenizers(s_tok, t_tok, teacher_model.get_input_embeddings().weight.shape[0])
    else:
        t_prompts = teacher_prompts(t_tok, [examples[kept[i]] for i in order], template=prompt_template,
                                    suffix=prompt_suffix, chat_template=chat_template)
        cross = CrossTokenizer(s_tok, t_tok, prompt_table(s_prompts, t_prompts), mode=align_mode)
        log(f"tokenizers differ: the teacher reads the responses as text in its own tokens ({align_mode} "
            f"alignment); its prompts use its own chat template")
    student_model = _from_pretrained(s_res.path, "student", device_map={"": str(dev)}, dtype=dtype)
    student_model.eval()
    student_model.requires_grad_(False)
    if cross is not None:
        cross.student_eos |= set(eos_ids(student_model, s_tok))
    L_S, L_T = num_layers(student_model), num_layers(teacher_model)
    pairs = layer_map(layers, L_S, L_T)
    d_s, d_t = student_model.config.hidden_size, teacher_model.config.hidden_size
    log(f"student {L_S} layers x {d_s}, teacher {L_T} layers x {d_t}; layer pairs: {_fmt_pairs(pairs)}")
    meta = {"student": student, "student_key": model_key(student), "student_path": s_res.path,
            "teacher": teacher, "teacher_key": model_key(teacher), "teacher_path": t_res.path,
            "student_layers": L_S, "teacher_layers": L_T, "dataset": dataset, "teacher_quant": teacher_quant,
            "align_mode": align_mode if cross is not None else None}
    info = collect(student_model, teacher_model, s_tok, s_prompts, pairs, states_dir, cross=cross,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, max_rows=max_rows,
                   temperature=temperature, top_p=top_p, convention=convention, seed=seed, meta=meta, log=log)
    del student_model, teacher_model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return info


def print_bridge(summary: dict[str, Any], console: Any) -> None:
    """Per-pair validation cosine of the saved rank, then the rank sweep."""
    from rich.table import Table

    t = Table(title=f"bridge r={summary['rank']}: validation cosine per layer pair")
    for c in ("student", "teacher", "val cos", "best epoch", "teacher var in r dims"):
        t.add_column(c, justify="right")
    for (a, b), c, e, v in zip(summary["pairs"], summary["val_cos"], summary["best_epoch"],
                               summary["explained_var"]):
        t.add_row(str(a), str(b), f"{c:.4f}", str(e), f"{100 * v:.1f}%")
    console.print(t)
    if len(summary["sweep"]) > 1:
        s = Table(title="rank sweep (mean over layer pairs)")
        for c in ("rank", "val cos", "teacher var in r dims"):
            s.add_column(c, justify="right")
        for r, m in sorted(summary["sweep"].items(), key=lambda kv: int(kv[0])):
            s.add_row(r + (" *" if int(r) == summary["best_rank"] else ""), f"{m['mean_val_cos']:.4f}",
                      f"{100 * m['mean_explained_var']:.1f}%")
        console.print(s)
    console.print(f"wrote {summary['output']} (r={summary['rank']}, mean val cos "
                  f"{sum(summary['val_cos']) / len(summary['val_cos']):.4f})"
                  + (f"; other ranks in {', '.join(summary['other_ranks'])}" if summary["other_ranks"] else ""),
                  markup=False, highlight=False)
