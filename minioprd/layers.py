"""Which hidden states are compared: layer sets, the student->teacher layer map, and response positions.

Layer numbers are HF `hidden_states` indices: 1..L are block outputs (0, the embedding output, is never
used); L is taken after the final norm, as HF returns it.

Positions. A rollout is `[left-padded prompt (P columns) | response (R columns)]`; response token j sits at
column P+j. Two conventions say which hidden state belongs to it:
  predict (default): the state at P+j-1, which *predicts* token j (the positions whose logits
      output-space OPD uses). The state that emits the first response token is matched; the one after
      EOS is not.
  token: the state at P+j, as in the authors' code (`hidden[:, -R:]`). It never matches the state that
      emits the first response token; we measured that this drifts and breaks it (findings.md §1).
Windows (`last_k`, `first_k`, `last`) are chosen over response tokens and then shifted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minioprd.errors import MinioprdError


def select_layers(spec: str | list[int], num_layers: int, role: str = "student") -> list[int]:
    """Layer numbers (1-based hidden_states indices) for a set name or an explicit list."""
    if isinstance(spec, list):
        bad = [x for x in spec if not 1 <= x <= num_layers]
        if bad:
            raise MinioprdError(f"loss.layers has {bad} but the {role} has layers 1..{num_layers} "
                                f"(hidden_states index; 0, the embeddings, is not used)")
        if len(set(spec)) != len(spec):
            raise MinioprdError(f"loss.layers lists a layer twice: {spec}")
        return sorted(spec)
    if spec == "all":
        return list(range(1, num_layers + 1))
    if spec == "last":
        return [num_layers]
    if spec == "even":  # blocks 0, 2, 4, ... counted from 0 (the authors' naming)
        return list(range(1, num_layers + 1, 2))
    if spec == "odd":
        return list(range(2, num_layers + 1, 2))
    raise MinioprdError(f"loss.layers must be all, last, even, odd or a list of numbers, got {spec!r}")


def proportional_map(num_student: int, num_teacher: int) -> list[int]:
    """0-based teacher positions for each of `num_student` items: round(linspace(0, T-1, S)) (paper Eq. 11).

    One student item maps to the teacher's last; equal counts give the identity.
    """
    if num_student == 1:
        return [num_teacher - 1]
    return torch.linspace(0, num_teacher - 1, num_student, dtype=torch.float64).round().long().tolist()


def layer_map(spec: str | list[int], student_layers: int, teacher_layers: int,
              teacher_spec: str | list[int] = "auto") -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs.

    A set name (all/last/even/odd) selects that set in both models and maps proportionally among the
    selected layers (the authors' code); an explicit student list maps each layer l by Eq. 11 over the
    whole depth, round((l-1)/(L_S-1) * (L_T-1)) + 1, unless `teacher_spec` lists the teacher layers.
    """
    s = select_layers(spec, student_layers, "student")
    if teacher_spec != "auto":
        t = list(teacher_spec)  # positional pairs; two student layers may share a teacher layer
        bad = [x for x in t if not 1 <= x <= teacher_layers]
        if bad:
            raise MinioprdError(f"loss.teacher_layers has {bad} but the teacher has layers 1..{teacher_layers}")
        if len(t) != len(s):
            raise MinioprdError(f"loss.teacher_layers has {len(t)} layers but loss.layers selects {len(s)}: "
                                f"give one teacher layer per student layer")
        return list(zip(s, t))
    if isinstance(spec, list):
        full = proportional_map(student_layers, teacher_layers)
        return [(l, full[l - 1] + 1) for l in s]
    t = select_layers(spec, teacher_layers, "teacher")
    return [(sl, t[i]) for sl, i in zip(s, proportional_map(len(s), len(t)))]


def position_mask(response_mask: torch.Tensor, positions: str = "all", k: int = 2000) -> torch.Tensor:
    """(B, R) bool: which response tokens enter the loss. Responses are left-aligned in their columns."""
    valid = response_mask.bool()  # (B, R)
    if positions == "all":
        return valid
    n = valid.sum(1, keepdim=True)  # (B, 1) valid tokens per row, EOS included
    col = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)  # (1, R)
    if positions == "last":
        return valid & (col == n - 1)
    if positions == "last_k":
        return valid & (col >= n - k)
    if positions == "first_k":
        return valid & (col < k)
    raise MinioprdError(f"loss.positions must be all, last, last_k or first_k, got {positions!r}")


@dataclass
class Window:
    """Columns of the full sequence whose hidden states enter the loss, and their mask."""

    start: int  # first hidden-state column (already shifted by the convention)
    mask: torch.Tensor  # (B, W) bool over columns start .. start+W-1

    @property
    def stop(self) -> int:
        return self.start + self.mask.shape[1]


def state_window(prompt_len: int, selected: torch.Tensor, convention: str = "predict") -> Window:
    """Crop to the response columns that have any selected token, shifted by the position convention."""
    if convention not in ("predict", "token"):
        raise MinioprdError(f"loss.convention must be predict or token, got {convention!r}")
    cols = selected.any(0).nonzero().flatten()
    c0, c1 = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
    shift = -1 if convention == "predict" else 0
    return Window(start=prompt_len + c0 + shift, mask=selected[:, c0:c1])
