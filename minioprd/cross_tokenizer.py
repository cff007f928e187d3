"""Cross-tokenizer alignment: the teacher reads the student's rollout as *text*, in its own tokens.

    cross = CrossTokenizer(student_tok, teacher_tok, teacher_prompts=prompt_table(s_prompts, t_prompts))
    ti = cross.align(ro)            # TeacherInputs: the teacher's own rollout + a column map per convention
    states, mask = cross.teacher_states(teacher, ro, layers, window, "predict")   # (B, W, D_T) per layer

What the teacher reads, per rollout row:
  prompt    the teacher's own rendering of the same prompt (its chat template) when `teacher_prompts` knows
            the student's prompt ids, else the student's prompt decoded (special tokens kept as text) and
            re-tokenized by the teacher (a BOS added where the teacher wants one);
  response  the student's response tokens decoded to text and re-tokenized by the teacher
            (`add_special_tokens=False`), tokenized apart from the prompt as generation saw it; a final student
            EOS (end of turn) becomes the teacher's end-of-turn token.
Teacher ids are laid out like a `Rollout`: [left-padded prompt (P_T) | response (R_T), right-padded].

Alignment, in the text both read. Every token has an *end*: after it, the model has read the text up to
that point. Ends are compared exactly, as (characters read, bytes of the next character read): byte-level
BPE tokens may end inside a multi-byte character (é, 数, 🙂 are 2-4 bytes). Student response token j maps
to the *end-covering* teacher token: the first teacher token whose end is at or after the student token's end
(the one that completes the student token's last character; for equal ends the last such token). Then
  token convention (state at P+j):    the teacher state at that token has read the same text, or a few
                                      characters more when the teacher token runs past (`exact` False);
  predict convention (state at P+j-1): the student state that predicts token j has read the text up to the
                                      end of token j-1, so it maps to token j-1's teacher column, and token 0
                                      maps to the teacher's last prompt column (both have read the prompt).
A student token that ends inside a character maps only to a teacher token that ends at the same byte, else to
-1 (masked); `mode="exact"` masks every token whose end no teacher token shares (no look-ahead at all).
Bytes come from the token strings (byte-level BPE: GPT-2 byte alphabet; SentencePiece: ▁ and <0xNN>),
checked against the tokenizer's own decode; other tokenizers fall back to prefix decoding (student) or
offsets (teacher). Invalid UTF-8 (a response cut inside a character) reads as U+FFFD, as `decode` gives it.

Output-space (logit) OPD objectives cannot use this: the two vocabularies are different supports. They stay
restricted to a shared tokenizer.
"""

from __future__ import annotations

import bisect
import codecs
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from minioprd.errors import MinioprdError
from minioprd.layers import Window
from minioprd.rollout import Rollout

MODES = ("cover", "exact")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PROBE = "\u2063minioprd-end-probe\u2063"

Pos = tuple[int, int]  # (characters fully read, bytes of the next character read; -1: of an undecodable one)


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte as one printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _decoder_types(tok: Any) -> set[str]:
    backend = getattr(tok, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is None:
        return set()
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # noqa: BLE001 - an unknown decoder: treated as "other"
        return set()
    types: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                types.add(str(node["type"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(state)
    return types


class TokenBytes:
    """The bytes each token id stands for, from its token string (cached per id).

    kind: `bytelevel` (GPT-2 alphabet: Qwen, Llama 3, Phi-4, SmolLM2, ...), `sentencepiece` (▁ for a space,
    <0xNN> byte fallback: Llama 2, Mistral, Gemma) or `other` (each token decoded alone: approximate).
    Added tokens (<|im_end|>, <think>, ...) stand for their text.
    """

    def __init__(self, tok: Any):
        self.tok = tok
        types = _decoder_types(tok)
        self.kind = "bytelevel" if "ByteLevel" in types else \
            "sentencepiece" if types & {"ByteFallback", "Metaspace"} or "Replace" in types else "other"
        self.added = {int(i): t.content for i, t in getattr(tok, "added_tokens_decoder", {}).items()}
        self._cache: dict[int, bytes] = {}

    def of(self, ids: Sequence[int]) -> list[bytes]:
        out = []
        for i in ids:
            i = int(i)
            b = self._cache.get(i)
            if b is None:
                b = self._cache[i] = self._one(i)
            out.append(b)
        return out

    def _one(self, i: int) -> bytes:
        if i in self.added:
            return self.added[i].encode("utf-8")
        s = self.tok.convert_ids_to_tokens(i)
        if s is None:
            return b""
        if self.kind == "bytelevel":
            try:
                return bytes(_UNICODE_TO_BYTE[c] for c in s)
            except KeyError:
                pass
        elif self.kind == "sentencepiece":
            m = _BYTE_TOKEN.fullmatch(s)
            return bytes([int(m.group(1), 16)]) if m else s.replace("\u2581", " ").encode("utf-8")
        return self.tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode("utf-8")


def _decode(tok: Any, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def student_positions(tb: TokenBytes, ids: Sequence[int]) -> tuple[str, list[Pos]]:
    """The text of `ids` and each token's end as (chars read, bytes of the next char read)."""
    if not ids:
        return "", []
    pieces = tb.of(ids)
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    parts, ends, n = [], [], 0
    for b in pieces:
        out = dec.decode(b)
        parts.append(out)
        n += len(out)
        ends.append((n, len(dec.getstate()[0])))
    parts.append(dec.decode(b"", final=True))
    text = "".join(parts)
    # Part of a byte sequence that does not decode (read as U+FFFD) matches no teacher token.
    ends = [(c, -1) if p and (c >= len(text) or text[c] == "\ufffd") else (c, p) for c, p in ends]
    reference = _decode(tb.tok, ids)
    if text == reference:
        return text, ends
    if tb.kind == "sentencepiece" and text.startswith(" ") and text[1:] == reference:
        return text, ends  # decode strips the leading space of a first ▁token; after a prompt it is read
    return _prefix_positions(tb.tok, ids)


def _prefix_positions(tok: Any, ids: Sequence[int]) -> tuple[str, list[Pos]]:
    """Fallback for tokenizers whose token strings do not give bytes: decode every prefix (quadratic).

    A prefix whose text is not a prefix of the whole (a character cut in two) is marked as ending inside
    the next character, so it only maps to a teacher token ending at exactly the same place (never here).
    """
    text = _decode(tok, ids)
    ends: list[Pos] = []
    for k in range(1, len(ids) + 1):
        pre = _decode(tok, ids[:k])
        ends.append((len(pre), 0) if text.startswith(pre) else (max(0, len(pre) - 1), 1))
    return text, ends


def teacher_positions(tb: TokenBytes, text: str) -> tuple[list[int], list[Pos]]:
    """The teacher's ids for `text` and each teacher token's end in the same (chars, bytes) coordinates."""
    if not text:
        return [], []
    tok = tb.tok
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    raw = text.encode("utf-8")
    pieces = tb.of(ids) if tb.kind != "other" else None
    if pieces is not None and b"".join(pieces) == raw:
        byte_ends = list(accumulate(len(p) for p in pieces))
        if len(raw) == len(text):  # ASCII: a byte is a character
            return ids, [(b, 0) for b in byte_ends]
        starts = [0, *accumulate(len(ch.encode("utf-8")) for ch in text)]  # byte start of each char (+ total)
        out = []
        for b in byte_ends:
            c = bisect.bisect_right(starts, b) - 1
            out.append((c, b - starts[c]))
        return ids, out
    if not getattr(tok, "is_fast", False):
        raise MinioprdError(f"cannot align text to the teacher tokenizer {type(tok).__name__}: it is neither "
                            f"byte-level BPE nor SentencePiece and has no offsets (needs a fast tokenizer)")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(e), 0) for _, e in enc["offset_mapping"]]


def map_ends(student_ends: Sequence[Pos], teacher_ends: Sequence[Pos], mode: str = "cover") -> tuple[
        list[int], list[bool]]:
    """For each student end, the index of the end-covering teacher token (-1: none) and whether the ends match.

    Teacher ends must be non-decreasing (they are: tokens follow the text). Equal teacher ends (several
    offsets-only tokens on one character) resolve to the last of them, the one that has read it all.
    """
    if mode not in MODES:
        raise MinioprdError(f"alignment mode must be cover or exact, got {mode!r}")
    index, exact = [], []
    for pos in student_ends:
        j = bisect.bisect_left(teacher_ends, pos)
        if j == len(teacher_ends):
            index.append(-1)
            exact.append(False)
            continue
        same = teacher_ends[j] == pos
        j = bisect.bisect_right(teacher_ends, teacher_ends[j]) - 1
        ok = same or (mode == "cover" and pos[1] == 0)  # a split character needs the same split
        index.append(j if ok else -1)
        exact.append(same)
    return index, exact


@dataclass
class Alignment:
    """One student token sequence read by the teacher."""

    text: str
    teacher_ids: list[int]
    index: list[int]  # per student token: the end-covering teacher token (index into teacher_ids), -1 = none
    exact: list[bool]  # per student token: that teacher token ends exactly where the student token ends


def align_tokens(student_ids: Sequence[int], student: TokenBytes | Any, teacher: TokenBytes | Any,
                 mode: str = "cover") -> Alignment:
    """Decode `student_ids`, re-tokenize the text for the teacher and map every student token (no specials)."""
    s = student if isinstance(student, TokenBytes) else TokenBytes(student)
    t = teacher if isinstance(teacher, TokenBytes) else TokenBytes(teacher)
    text, s_ends = student_positions(s, list(student_ids))
    t_ids, t_ends = teacher_positions(t, text)
    index, exact = map_ends(s_ends, t_ends, mode)
    return Alignment(text, t_ids, index, exact)


def end_of_turn_id(tok: Any) -> int | None:
    """The token that ends an assistant turn in `tok`'s chat template (<|im_end|>, <|end|>, <|eot_id|>),
    else the tokenizer's EOS."""
    if getattr(tok, "chat_template", None):
        try:
            text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": _PROBE}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this conversation: use the EOS
            text = ""
        if _PROBE in text:
            after = text.split(_PROBE, 1)[1]
            ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
            added = {int(i) for i in getattr(tok, "added_tokens_decoder", {})}
            if ids and int(ids[0]) in added:
                return int(ids[0])
    return tok.eos_token_id


def same_tokenizer(student_tok: Any, teacher_tok: Any) -> bool:
    """True when both map the probe texts (and a chat prompt) to the same ids: the teacher can read the
    student's ids directly (then `models.check_tokenizers` checks the vocabulary rows)."""
    from minioprd.models import _PROBES

    texts = list(_PROBES)
    if getattr(student_tok, "chat_template", None):
        texts.append(student_tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                                     tokenize=False, add_generation_prompt=True))
    for text in texts:
        if list(student_tok(text, add_special_tokens=False)["input_ids"]) != \
                list(teacher_tok(text, add_special_tokens=False)["input_ids"]):
            return False
    return student_tok.eos_token_id == teacher_tok.eos_token_id


def encode_prompts(tok: Any, texts: Iterable[str]) -> list[list[int]]:
    """Rendered prompt texts -> ids as `data.tokenize_prompts` makes them (BOS where wanted), nothing dropped."""
    bos, bos_id = getattr(tok, "bos_token", None), getattr(tok, "bos_token_id", None)
    wants_bos = bool(getattr(tok, "add_bos_token", False)) and bos is not None and bos_id is not None
    out = []
    for text in texts:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if wants_bos and not text.startswith(bos):
            ids = [bos_id] + ids
        out.append(ids)
    return out


def teacher_prompts(teacher_tok: Any, examples: Sequence[Any], template: str = "{prompt}", suffix: str = "",
                    chat_template: str = "auto", system_prompt: str | None = None) -> list[list[int]]:
    """The teacher's own rendering (its chat template) of each example's prompt, as ids."""
    from minioprd.data import render_prompts

    texts = render_prompts(teacher_tok, list(examples), template=template, suffix=suffix,
                           chat_template=chat_template, system_prompt=system_prompt)
    return encode_prompts(teacher_tok, texts)


def prompt_table(student_prompts: Sequence[Sequence[int]], teacher_prompts: Sequence[Sequence[int]]) -> dict[
        tuple[int, ...], list[int]]:
    """{student prompt ids: teacher prompt ids}, the lookup `CrossTokenizer` uses per rollout row."""
    if len(student_prompts) != len(teacher_prompts):
        raise ValueError(f"{len(student_prompts)} student prompts but {len(teacher_prompts)} teacher prompts")
    return {tuple(int(i) for i in s): list(t) for s, t in zip(student_prompts, teacher_prompts)}


@dataclass
class TeacherInputs:
    """A student rollout as the teacher reads it."""

    rollout: Rollout  # the teacher's ids: [left-padded prompt (P_T) | response (R_T), right-padded]
    token_cols: torch.Tensor  # (B, R) long: teacher column (whole sequence) of the end-covering token; -1 none
    exact: torch.Tensor  # (B, R) bool: that teacher token ends exactly where the student token does

    def columns(self, convention: str = "predict") -> torch.Tensor:
        """(B, R) long: the teacher column whose state pairs with student response token j under
        `convention` (see `layers`): token -> the end-covering column; predict -> token j-1's column, and
        the teacher's last prompt column for j = 0. -1 where there is none."""
        if convention == "token":
            return self.token_cols
        if convention != "predict":
            raise MinioprdError(f"convention must be predict or token, got {convention!r}")
        first = torch.full_like(self.token_cols[:, :1], self.rollout.prompt_len - 1)
        return torch.cat([first, self.token_cols[:, :-1]], 1)

    def coverage(self, response_mask: torch.Tensor) -> tuple[float, float]:
        """(aligned, exactly aligned) fractions of the student's response tokens."""
        valid = response_mask.bool()
        n = max(1, int(valid.sum()))
        return int(((self.token_cols >= 0) & valid).sum()) / n, int((self.exact & valid).sum()) / n


class CrossTokenizer:
    """Re-tokenizes student rollouts for a teacher with another tokenizer and maps the columns.

    `teacher_prompts`: {student prompt ids (tuple): teacher prompt ids} (`prompt_table`), so the teacher reads
    prompts in its own chat template; unknown prompts are decoded and re-tokenized. `student_eos`: ids ending
    a student response (default: its EOS and end-of-turn token); a final one becomes `teacher_eos` (default:
    the teacher's end-of-turn token, `end_of_turn_id`). `mode`: cover (default) or exact, see the module doc.
    """

    def __init__(self, student_tok: Any, teacher_tok: Any,
                 teacher_prompts: Mapping[tuple[int, ...], Sequence[int]] | None = None, *,
                 student_eos: Iterable[int] | None = None, teacher_eos: int | None = None, mode: str = "cover"):
        if mode not in MODES:
            raise MinioprdError(f"alignment mode must be cover or exact, got {mode!r}")
        self.student_tok, self.teacher_tok, self.mode = student_tok, teacher_tok, mode
        self.s_bytes, self.t_bytes = TokenBytes(student_tok), TokenBytes(teacher_tok)
        self.prompts = dict(teacher_prompts or {})
        eos = set(student_eos) if student_eos is not None else \
            {i for i in (student_tok.eos_token_id, end_of_turn_id(student_tok)) if i is not None}
        self.student_eos = {int(i) for i in eos}
        self.teacher_eos = teacher_eos if teacher_eos is not None else end_of_turn_id(teacher_tok)
        if self.teacher_eos is None:
            raise MinioprdError("the teacher tokenizer has no EOS token: cannot end the teacher's responses")
        pad = teacher_tok.pad_token_id
        self.teacher_pad = int(pad if pad is not None else self.teacher_eos)

    def teacher_prompt(self, student_prompt: Sequence[int]) -> list[int]:
        key = tuple(int(i) for i in student_prompt)
        if key in self.prompts:
            return list(self.prompts[key])
        return encode_prompts(self.teacher_tok, [_decode(self.student_tok, key)])[0]

    def align_row(self, prompt: Sequence[int], response: Sequence[int]) -> tuple[list[int], list[int], list[int],
                                                                                  list[bool]]:
        """(teacher prompt ids, teacher response ids, per student response token the teacher response index
        or -1, exact flags) for one row; `response` holds the valid tokens only (EOS included)."""
        response = [int(i) for i in response]
        eos = bool(response) and response[-1] in self.student_eos
        body = response[:-1] if eos else response
        a = align_tokens(body, self.s_bytes, self.t_bytes, self.mode)
        t_resp, index, exact = a.teacher_ids, a.index, a.exact
        if eos:
            index, exact = index + [len(t_resp)], exact + [True]
            t_resp = t_resp + [int(self.teacher_eos)]
        return self.teacher_prompt(prompt), t_resp, index, exact

    def align(self, ro: Rollout) -> TeacherInputs:
        B, R = ro.response_mask.shape
        P = ro.prompt_len
        rows = []
        for b in range(B):
            prompt = ro.input_ids[b, :P][ro.attention_mask[b, :P].bool()].tolist()
            response = ro.input_ids[b, P:][ro.response_mask[b].bool()].tolist()
            rows.append(self.align_row(prompt, response))
        P_T = max(1, max(len(r[0]) for r in rows))
        R_T = max(1, max(len(r[1]) for r in rows))
        ids = torch.full((B, P_T + R_T), self.teacher_pad, dtype=torch.long)
        attn = torch.zeros((B, P_T + R_T), dtype=torch.long)
        rmask = torch.zeros((B, R_T), dtype=torch.bool)
        cols = torch.full((B, R), -1, dtype=torch.long)
        exact = torch.zeros((B, R), dtype=torch.bool)
        for b, (tp, tr, index, ex) in enumerate(rows):
            ids[b, P_T - len(tp):P_T] = torch.tensor(tp, dtype=torch.long)
            attn[b, P_T - len(tp):P_T] = 1
            if tr:
                ids[b, P_T:P_T + len(tr)] = torch.tensor(tr, dtype=torch.long)
                attn[b, P_T:P_T + len(tr)] = 1
                rmask[b, :len(tr)] = True
            for j, (i, e) in enumerate(zip(index, ex)):
                if i >= 0:
                    cols[b, j] = P_T + i
                    exact[b, j] = e
        device = ro.input_ids.device
        teacher = Rollout(ids.to(device), attn.to(device), rmask.to(device), P_T)
        return TeacherInputs(teacher, cols.to(device), exact.to(device))

    @torch.no_grad()
    def teacher_states(self, teacher: torch.nn.Module, ro: Rollout, layers: list[int], window: Window,
                       convention: str = "predict", inputs: TeacherInputs | None = None,
                       device: torch.device | str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher's states of `layers` paired with the student's `window` columns (`layers.state_window`).

        Returns ([(B, W, D_T) per layer], mask (B, W)): `window.mask` minus the student tokens with no teacher
        counterpart (their rows hold some other aligned state; keep them out of the loss with the mask).
        """
        from minioprd.capture import capture_hidden

        ti = inputs if inputs is not None else self.align(ro)
        W = window.mask.shape[1]
        j0 = window.start - ro.prompt_len + (1 if convention == "predict" else 0)
        cols = ti.columns(convention)[:, j0:j0 + W].to(window.mask.device)  # (B, W)
        mask = window.mask & (cols >= 0)
        dev = torch.device(device) if device is not None else next(teacher.parameters()).device
        if not mask.any():
            d = teacher.config.hidden_size
            return [torch.zeros(*cols.shape, d, device=dev) for _ in layers], mask
        t0, t1 = int(cols[mask].min()), int(cols[mask].max()) + 1
        tr = ti.rollout
        got = capture_hidden(teacher, tr.input_ids.to(dev), tr.attention_mask.to(dev), tr.position_ids().to(dev),
                             layers, t0, t1)
        idx = (cols - t0).clamp(0, t1 - t0 - 1).to(dev)[..., None]  # (B, W, 1)
        return [h.gather(1, idx.expand(-1, -1, h.shape[-1])) for h in got], mask
