"""Prompts for on-policy distillation: load a data set, render each prompt for the student, tokenize it,
and hand out prompt indices in a seeded order that a checkpoint can resume exactly.

    examples = load_examples("problems.parquet", max_rows=1000)          # or a hub name, or builtin:arithmetic
    texts = render_prompts(tokenizer, examples, suffix="Put the answer in \\boxed{}.")
    ids, kept, skipped = tokenize_prompts(tokenizer, texts, max_prompt_tokens=512)
    sampler = PromptSampler(len(ids), seed=0)
    batch = [ids[i] for i in sampler.next_batch(4)]

Distillation needs only prompts; answers (`Example.answer`) are read when the data set has them, for evaluation.
`builtin:arithmetic` is a tiny offline task with exact answers for the CPU demo and the tests.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import random
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from minioprd.errors import MinioprdError

logger = logging.getLogger(__name__)

# Local file suffix -> the `datasets` builder that reads it.
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Tried in this order when `field="auto"`: the first column present holds the prompt.
PROMPT_FIELDS = ("prompt", "question", "problem", "messages", "query", "instruction", "input")
# Tried in this order when `answer_field="auto"`; dotted names look inside a struct column.
ANSWER_FIELDS = ("answer", "ground_truth", "solution", "final_answer", "reward_model.ground_truth")
BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS = {"train": (2000, 0), "test": (200, 1)}  # split -> (rows, seed)
CHAT_TEMPLATE_CHOICES = ("auto", "true", "false")
LONG_PROMPT_CHOICES = ("skip", "truncate")
# How long to wait for the hub before telling the user to pass a local file: `datasets` itself retries
# for ~25 s when the network is down.
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class Example:
    """One prompt, with the ground-truth answer when the data set has one."""

    prompt: str | list[dict[str, str]]  # plain text, or chat messages [{role, content}, ...] ending with the user
    answer: str | None = None  # ground truth, for evaluation; distillation itself never reads it
    meta: dict[str, Any] = field(default_factory=dict)  # row index and the row's other scalar columns


# --------------------------------------------------------------------------------------------- loading


def load_examples(source: str, split: str = "train", field: str = "auto", answer_field: str = "auto",
                  max_rows: int = 0, cache_dir: str | None = None) -> list[Example]:
    """Read prompts (and answers, when present) from a local file, a hub data set or `builtin:arithmetic`.

    `source` is a .jsonl/.json/.parquet/.csv file (which has only a `train` split, so `split` is ignored), a
    local data set directory, a hub name (`openai/gsm8k:main` picks the config `main`), or `builtin:NAME`.
    `field`/`answer_field` name the columns (`auto` detects them; dotted names such as
    `reward_model.ground_truth` look inside a struct column; `answer_field="none"` reads no answers).
    `max_rows` > 0 keeps only the first rows. Raises MinioprdError for anything the user can fix.
    """
    if max_rows < 0:
        raise MinioprdError(f"max_rows must be >= 0 (0 = all rows), got {max_rows}")
    if source.startswith(BUILTIN_PREFIX):
        examples = _load_builtin(source, split)
        return examples[:max_rows] if max_rows > 0 else examples

    ds = _load_dataset(source, split, cache_dir)
    if len(ds) == 0:
        raise MinioprdError(f"data set '{source}' (split {split}) has no rows; pass a data set with prompts")
    if max_rows > 0 and len(ds) > max_rows:
        # Cut before converting rows to Python objects: hub sets can be large and we need only a few.
        ds = ds.select(range(max_rows))
    columns = list(ds.column_names)
    rows = ds.to_list()

    prompt_key = _pick_field(source, columns, rows[0], field, PROMPT_FIELDS, kind="prompt")
    answer_key = None
    if answer_field.lower() != "none":
        answer_key = _pick_field(source, columns, rows[0], answer_field, ANSWER_FIELDS, kind="answer",
                                 required=answer_field != "auto")

    examples: list[Example] = []
    for i, row in enumerate(rows):
        prompt = _to_prompt(_get(row, prompt_key), source, prompt_key, i)
        if prompt is None:
            continue  # empty rows are common at the end of CSVs; counted below, fatal only if all are empty
        answer = _to_answer(_get(row, answer_key)) if answer_key else None
        top = {prompt_key.split(".")[0], answer_key.split(".")[0] if answer_key else None}
        meta: dict[str, Any] = {"row": i}
        # Keep short scalar columns (data_source, id, level, ...) for per-source reports; skip the rest.
        meta.update({k: v for k, v in row.items()
                     if k not in top and isinstance(v, (str, int, float, bool)) and len(str(v)) <= 200})
        examples.append(Example(prompt=prompt, answer=answer, meta=meta))

    if not examples:
        raise MinioprdError(f"all {len(rows)} prompts in column '{prompt_key}' of '{source}' are empty; "
                            f"pick the prompt column with --field NAME (data.field=NAME)")
    if len(examples) < len(rows):
        logger.info("skipped %d empty prompts of %d in '%s'", len(rows) - len(examples), len(rows), source)
    return examples


def _looks_like_path(source: str) -> bool:
    """True if `source` can only mean a local path (a hub name is `name` or `owner/name`)."""
    if Path(source).suffix.lower() in FILE_FORMATS or source.startswith(("/", ".", "~")):
        return True
    return "\\" in source or source.count("/") > 1 or os.sep != "/" and os.sep in source


def _load_dataset(source: str, split: str, cache_dir: str | None) -> Any:
    """Open `source` with `datasets` as one split; every failure the user can fix becomes a MinioprdError."""
    try:
        import datasets  # slow to import; only commands that read data pay for it
    except ImportError:  # a bare GPU image may lack it: builtin data sets need no `datasets`
        raise MinioprdError(f"reading data set '{source}' needs the `datasets` package: `pip install datasets`, "
                            f"or use a builtin data set (builtin:chat, builtin:arithmetic)") from None

    path = Path(source).expanduser()
    if path.is_file():
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise MinioprdError(f"data set '{source}' has an unsupported suffix '{path.suffix}'; "
                                f"use one of {', '.join(FILE_FORMATS)}")
        if _has_no_rows(path):
            raise MinioprdError(f"data set '{source}' has no rows; pass a file with prompts")
        if split != "train":
            # `datasets` names the only split of a data file `train`: the file is the data whatever it's called.
            logger.info("'%s' is a single file; reading all of it for split '%s'", source, split)
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=cache_dir)
        except Exception as e:  # pyarrow/json parse errors have many types; all mean "this file is malformed"
            raise MinioprdError(f"could not read '{source}' as {path.suffix[1:]}: {_parse_error(e, datasets)}; "
                                f"check the file") from e
    if path.is_dir():
        return _call_load(datasets, str(path), None, split, cache_dir, source)
    if _looks_like_path(source):
        raise MinioprdError(f"data file '{source}' does not exist; check the path (data.dataset=PATH)")

    name, _, config = source.partition(":")
    if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
        raise MinioprdError(f"could not reach the Hugging Face Hub to load data set '{source}'; pass a local "
                            f".jsonl/.json/.parquet/.csv file, or set HF_DATASETS_OFFLINE=1 to use a cached copy")
    return _call_load(datasets, name, config or None, split, cache_dir, source)


def _has_no_rows(path: Path) -> bool:
    """True for an empty file or a parquet file with 0 rows, which `datasets` reports as a generation error."""
    if path.stat().st_size == 0:
        return True
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_metadata(path).num_rows == 0
        except Exception:  # not valid parquet: let `datasets` say so
            return False
    return False


def _call_load(datasets: Any, name: str, config: str | None, split: str, cache_dir: str | None,
               source: str) -> Any:
    """`datasets.load_dataset(name, config, split=split)`, with its errors turned into one-line advice."""
    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except ConnectionError as e:  # what `datasets` raises when offline and the set isn't cached
        raise MinioprdError(f"could not reach the Hugging Face Hub to load data set '{source}' "
                            f"({_first_line(e)}); pass a local .jsonl/.json/.parquet/.csv file") from e
    except datasets.exceptions.DatasetNotFoundError as e:
        raise MinioprdError(f"data set '{source}' was not found on the Hugging Face Hub (or it is gated: "
                            f"log in with `hf auth login`); check the name or pass a local file") from e
    except ValueError as e:
        msg = str(e)
        if "Unknown split" in msg:
            found = re.search(r"one of (\[.*?\])", msg)
            splits = found.group(1) if found else "(unknown)"
            raise MinioprdError(f"data set '{source}' has no split '{split}': available splits {splits}; "
                                f"pass --split NAME (data.split=NAME)") from e
        if "Config name is missing" in msg:
            found = re.search(r"configs: (\[.*?\])", msg)
            configs = found.group(1) if found else "(see the data set card)"
            raise MinioprdError(f"data set '{source}' has several configs {configs}; name one as "
                                f"'{name}:CONFIG' (data.dataset={name}:CONFIG)") from e
        raise MinioprdError(f"could not load data set '{source}': {_first_line(e)}") from e


def _hub_reachable() -> bool:
    """A quick TCP connect to the hub, so an offline machine fails in seconds instead of retrying for ~25 s."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connect proves nothing: let `datasets` try
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    except Exception:  # an odd HF_ENDPOINT: fall back to the public hub
        host, port = "huggingface.co", 443
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _parse_error(e: BaseException, datasets: Any) -> str:
    """The parser's own message: `datasets` wraps it in a generic "error while generating the dataset"."""
    while isinstance(e, datasets.exceptions.DatasetsError) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return _first_line(e).rstrip(".")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _get(row: dict[str, Any], key: str | None) -> Any:
    """`row[key]`, where `a.b` reads key `b` of the struct column `a`; None when any part is missing."""
    value: Any = row
    for part in (key or "").split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _has(columns: list[str], first_row: dict[str, Any], key: str) -> bool:
    if "." not in key:
        return key in columns
    head, _, rest = key.partition(".")
    return head in columns and isinstance(first_row.get(head), dict) and _get(first_row[head], rest) is not None


def _pick_field(source: str, columns: list[str], first_row: dict[str, Any], requested: str,
                candidates: tuple[str, ...], kind: str, required: bool = True) -> str | None:
    """The column to read: `requested`, or with `auto` the first of `candidates` present."""
    shown = "[" + ", ".join(columns) + "]"
    flag = "--field NAME (data.field=NAME)" if kind == "prompt" else "answer_field=NAME (or none)"
    if requested == "auto":
        for key in candidates:
            if _has(columns, first_row, key):
                return key
        if required:
            raise MinioprdError(f"data set '{source}' has no {kind} column: found columns {shown}; pass {flag}")
        return None
    if _has(columns, first_row, requested):
        return requested
    close = difflib.get_close_matches(requested, columns, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise MinioprdError(f"data set '{source}' has no column '{requested}'{hint}: found columns {shown}; "
                        f"pass {flag}")


def _text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of an OpenAI-style list of parts."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join((p.get("text") or "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _to_prompt(value: Any, source: str, key: str, row: int) -> str | list[dict[str, str]] | None:
    """A row's prompt as text or chat messages ending with a user turn; None when it is empty."""
    if value is None:
        return None
    if isinstance(value, list):
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            raise MinioprdError(f"row {row} of column '{key}' in '{source}' is a list but not chat messages "
                                f"({{role, content}} dicts); pick another column with --field NAME")
        messages = [{"role": str(m["role"]), "content": _text_of(m["content"])} for m in value]
        # A conversation data set ends with the reference reply: the student must write its own.
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or not any(m["content"].strip() for m in messages if m["role"] == "user"):
            return None
        return messages
    text = str(value)
    return text if text.strip() else None


_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def _to_answer(value: Any) -> str | None:
    """Ground truth as a short string: GSM8K's `... #### 72` gives `72`, `\\boxed{204}` gives `204`, and a
    worked solution gives the content of its last box."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    gsm = _GSM8K_ANSWER.search(text)
    if gsm:
        return gsm.group(1).replace(",", "").strip()  # GSM8K writes 1,000; graders want 1000
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    return text or None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces matched; None if none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: not a usable answer


# --------------------------------------------------------------------------------------------- builtin task


CHAT_TRAIN_ROWS = 48  # builtin:chat: the first 48 of the shipped prompts train, the other 12 are held out


def _load_builtin(source: str, split: str) -> list[Example]:
    name = source[len(BUILTIN_PREFIX):]
    if name == "chat":  # 60 short general chat prompts (no answers), for real-weights runs such as `demo --real`
        if split not in ("train", "test"):
            raise MinioprdError(f"data set '{source}' has no split '{split}': available splits [train, test]; "
                                "pass --split NAME (data.split=NAME)")
        path = Path(__file__).with_name("chat_prompts.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = rows[:CHAT_TRAIN_ROWS] if split == "train" else rows[CHAT_TRAIN_ROWS:]
        return [Example(prompt=r["prompt"], meta={"row": i}) for i, r in enumerate(rows)]
    if name != "arithmetic":
        raise MinioprdError(f"unknown built-in data set '{source}'; the built-in ones are builtin:arithmetic and "
                            "builtin:chat")
    if split not in BUILTIN_SPLITS:
        raise MinioprdError(f"data set '{source}' has no split '{split}': available splits "
                            f"[{', '.join(BUILTIN_SPLITS)}]; pass --split NAME (data.split=NAME)")
    n_train, seed_train = BUILTIN_SPLITS["train"]
    train = arithmetic_examples(n_train, seed=seed_train)
    if split == "train":
        return train
    n, seed = BUILTIN_SPLITS[split]
    # The test split must not share a question with train, or evaluation would measure memorisation.
    return arithmetic_examples(n, seed=seed, exclude={str(e.prompt) for e in train})


def arithmetic_examples(n: int, seed: int = 0, digits: int = 2, exclude: set[str] | None = None) -> list[Example]:
    """`n` distinct questions like `What is 47+38?` (sums and non-negative differences of operands with up to
    `digits` digits), the same for the same seed; prompts in `exclude` are never produced."""
    if digits < 1:
        raise MinioprdError(f"digits must be >= 1, got {digits}")
    top = 10 ** digits
    possible = top * top + top * (top + 1) // 2  # every a+b, and every a-b with a >= b
    exclude = exclude or set()
    if n > possible - len(exclude):
        raise MinioprdError(f"cannot make {n} distinct {digits}-digit arithmetic questions (at most "
                            f"{possible - len(exclude)}); ask for fewer or more digits")
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[Example] = []
    while len(out) < n:
        a, b, op = rng.randrange(top), rng.randrange(top), rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a  # keep results non-negative: the demo models need no minus sign
        prompt = f"What is {a}{op}{b}?"
        if prompt in seen:
            continue
        seen.add(prompt)
        result = a + b if op == "+" else a - b
        out.append(Example(prompt=prompt, answer=str(result), meta={"a": a, "b": b, "op": op}))
    return out


def arithmetic_solution(example: Example) -> str:
    """The reference response: one step per column from the units up, then the boxed answer.

    `47+38` -> `7+8=15, carry 1. 4+3+1=8. \\boxed{85}`; `52-38` -> `12-8=4, borrow 1. 5-1-3=1. \\boxed{14}`;
    `5+38` -> `5+8=13, carry 1. 0+3+1=4. \\boxed{43}`.
    Short on purpose: the tiny demo models learn it in a minute on a CPU.
    """
    a, b, op = int(example.meta["a"]), int(example.meta["b"]), str(example.meta["op"])
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db))
    steps: list[str] = []
    carry = 0  # the carry (addition) or borrow (subtraction) coming into this column
    for col in range(width):
        # A digit a shorter operand lacks is written as 0: every step has the same shape, which the
        # tiny demo models learn faster than a special case.
        x = int(da[col]) if col < len(da) else 0
        y = int(db[col]) if col < len(db) else 0
        if op == "+":
            total = x + y + carry
            step = f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}"
            # The last column writes its whole sum (e.g. 12), which already holds the final carry.
            carry = 1 if total >= 10 and col < width - 1 else 0
            steps.append(step + (", carry 1" if carry else ""))
        else:  # a >= b, so the last column never borrows
            diff = x - carry - y
            borrow = 1 if diff < 0 else 0
            step = f"{x + 10 * borrow}" + (f"-{carry}" if carry else "") + f"-{y}={diff + 10 * borrow}"
            steps.append(step + (", borrow 1" if borrow else ""))
            carry = borrow
    result = a + b if op == "+" else a - b
    return ". ".join(steps) + f". \\boxed{{{result}}}"


# --------------------------------------------------------------------------------------------- rendering


def render_prompts(tokenizer: Any, examples: list[Example], template: str = "{prompt}", suffix: str = "",
                   chat_template: str = "auto", system_prompt: str | None = None) -> list[str]:
    """Each example as the exact text the student continues.

    The user text becomes `template.format(prompt=text)` plus `suffix` (joined by a space unless the suffix
    starts with whitespace); for chat messages this applies to the last user message. With a chat template
    (`auto`: if the tokenizer has one; `true`: required; `false`: never) the messages are wrapped with
    `apply_chat_template(..., add_generation_prompt=True)`; without one, the messages' contents are joined.
    `system_prompt`, if given, replaces the messages' own system message.
    """
    mode = str(chat_template).lower()
    if mode not in CHAT_TEMPLATE_CHOICES:
        raise MinioprdError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_CHOICES)}, got {chat_template!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "true" and not has_template:
        raise MinioprdError("chat_template=true but the tokenizer has no chat template; use a chat (instruct) "
                            "model or set chat_template=false (data.chat_template=false)")
    use_template = has_template and mode != "false"
    _check_template(template)

    out: list[str] = []
    for ex in examples:
        messages = _user_messages(ex.prompt, template, suffix, system_prompt)
        if use_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages if m["content"])
        out.append(text)
    return out


def _check_template(template: str) -> None:
    """Fail once, up front, on a template `str.format` cannot fill (LaTeX braces are the usual cause)."""
    if "{prompt}" not in template:
        raise MinioprdError(f"prompt template {template!r} has no {{prompt}}; add it "
                            f"(data.prompt_template='... {{prompt}} ...')")
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise MinioprdError(f"prompt template {template!r} has braces other than {{prompt}} ({_first_line(e)}); "
                            f"write literal braces as {{{{ }}}} or put the text in data.prompt_suffix") from e


def _with_suffix(text: str, template: str, suffix: str) -> str:
    text = template.format(prompt=text)
    if not suffix:
        return text
    return text + (suffix if suffix[0].isspace() else " " + suffix)


def _user_messages(prompt: str | list[dict[str, str]], template: str, suffix: str,
                   system_prompt: str | None) -> list[dict[str, str]]:
    """The chat messages of one prompt, with template and suffix applied to the last user message."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": _with_suffix(prompt, template, suffix)}]
    else:
        messages = [dict(m) for m in prompt]  # copies: the examples are reused across renders
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        target = users[-1] if users else len(messages) - 1
        messages[target]["content"] = _with_suffix(messages[target]["content"], template, suffix)
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]
    return messages


# --------------------------------------------------------------------------------------------- tokenizing


def tokenize_prompts(tokenizer: Any, texts: list[str], max_prompt_tokens: int,
                     long_prompts: str = "skip") -> tuple[list[list[int]], list[int], int]:
    """Token ids of each rendered prompt; returns (ids, indices of the kept texts, number skipped).

    No special tokens are added except a BOS for tokenizers that want one (`add_bos_token`) when the text does
    not already start with it, so a chat-template text never gets a second BOS (nor a trailing EOS).
    Prompts longer than `max_prompt_tokens` are skipped, or with `long_prompts="truncate"` cut to their
    last tokens (a leading BOS is kept): the end holds the question and the generation prompt.
    """
    if max_prompt_tokens < 1:
        raise MinioprdError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if long_prompts not in LONG_PROMPT_CHOICES:
        raise MinioprdError(f"long_prompts must be skip or truncate, got {long_prompts!r}")
    if not texts:
        raise MinioprdError("no prompts to tokenize; check the data set")
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    wants_bos = bool(getattr(tokenizer, "add_bos_token", False)) and bos is not None and bos_id is not None
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    ids: list[list[int]] = []
    kept: list[int] = []
    too_long = empty = 0
    for i, (text, tokens) in enumerate(zip(texts, encoded)):
        tokens = list(tokens)
        if wants_bos and not text.startswith(bos):
            tokens = [bos_id] + tokens
        if not tokens:
            empty += 1  # generation needs at least one prompt token
            continue
        if len(tokens) > max_prompt_tokens:
            if long_prompts == "skip":
                too_long += 1
                continue
            starts_with_bos = bos_id is not None and tokens[0] == bos_id and max_prompt_tokens > 1
            tail = tokens[len(tokens) - (max_prompt_tokens - starts_with_bos):]
            tokens = ([bos_id] if starts_with_bos else []) + tail
        ids.append(tokens)
        kept.append(i)
    if not ids:
        if too_long:
            raise MinioprdError(f"all {len(texts)} prompts are longer than max_prompt_tokens={max_prompt_tokens}"
                                f"{f' ({empty} empty)' if empty else ''}; raise data.max_prompt_tokens or use "
                                f"data.long_prompts=truncate")
        raise MinioprdError(f"all {len(texts)} prompts are empty after rendering; check the data set and "
                            f"data.prompt_template")
    if too_long:
        logger.info("skipped %d of %d prompts longer than %d tokens", too_long, len(texts), max_prompt_tokens)
    return ids, kept, too_long + empty


# --------------------------------------------------------------------------------------------- sampling


# Length grouping pools this many steps' prompts, sorts the pool by length and cuts it into steps (HF Trainer's
# group_by_length uses 50). Measured on MATH-train with the Qwen3 tokenizer, 4 prompts per step, one epoch:
# left padding is 42% of the padded prompt tokens unsorted, 13% at 10, 3.5% at 50, 0.9% at 200, 0.06% for one
# sort of the whole epoch. Past 50 the saving is a few points of prompt tokens, while a step's companions come
# from an ever larger pool, i.e. are picked ever more by length alone (one epoch-wide sort would pair the same
# prompts in every epoch, up to ties).
LENGTH_GROUP_FACTOR = 50


class PromptSampler:
    """Endless, seeded, epoch-shuffled stream of prompt indices; its state (epoch, position, seed, grouping) is a
    small dict for exact resume.

    Each epoch is a fresh permutation of range(n) seeded by (seed, epoch), so every prompt is used once per
    epoch and a resumed run draws exactly the batches the uninterrupted run would have. Batches may span
    epochs. With shuffle=False the order is 0, 1, ..., n-1, 0, 1, ...

    With `lengths` (each prompt's token count) and `group` (prompts per step: the `k` every `next_batch` draws),
    each epoch's permutation is length-grouped: cut into pools of LENGTH_GROUP_FACTOR * group prompts, each pool
    sorted longest first and cut into steps of `group`, and the epoch's full steps put in a seeded random order
    (kept in pool order when shuffle=False). Every prompt is still used once per epoch; the prompts of a step
    have similar lengths, so the rollout's left padding is small, and come longest first, so the contiguous
    per-process shares of a step have similar lengths too. When n is not a multiple of `group`, the one step per
    epoch that crosses into the next epoch is two sorted runs (the end of one epoch, the start of the next).
    `group` is ignored without `lengths`.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, lengths: list[int] | None = None,
                 group: int = 0):
        if n < 1:
            raise MinioprdError("no prompts to sample from; check the data set and data.max_prompt_tokens")
        if lengths is not None and len(lengths) != n:
            raise MinioprdError(f"length grouping needs one length per prompt: got {len(lengths)} for {n} prompts")
        if lengths is not None and group < 1:
            raise MinioprdError(f"length grouping needs the prompts per step (group >= 1), got {group}")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.lengths = list(lengths) if lengths is not None else None
        self.group = group if lengths is not None else 0  # 0 = no length grouping
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            # A string seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
            random.Random(f"minioprd-prompts:{self.seed}:{epoch}").shuffle(order)
        return self._grouped(order, epoch) if self.group else order

    def _grouped(self, order: list[int], epoch: int) -> list[int]:
        """`order` length-grouped into steps of `group` (see the class docstring); the same prompts."""
        g, lengths = self.group, self.lengths
        assert lengths is not None
        # Steps draw `group` prompts each, so epoch e starts e*n prompts into the stream: the step crossing into
        # it takes its first `head` prompts. Cutting the rest from there keeps every later step one sorted group.
        head = min(-epoch * self.n % g, self.n)
        pool_size = LENGTH_GROUP_FACTOR * g
        steps: list[list[int]] = []
        for start in range(head, self.n, pool_size):
            # Stable sort: equal lengths keep the seeded order, so the result depends on (seed, epoch) only.
            pool = sorted(order[start:start + pool_size], key=lambda i: -lengths[i])
            steps.extend(pool[j:j + g] for j in range(0, len(pool), g))
        # Only the epoch's last pool can end in a partial step; it stays last, where the step crossing into the
        # next epoch takes it. The full steps are shuffled so step length does not trend within each pool (a
        # long-to-short sawtooth every LENGTH_GROUP_FACTOR steps would line up with the schedule).
        tail = steps.pop() if steps and len(steps[-1]) < g else []
        if self.shuffle:
            random.Random(f"minioprd-length-groups:{self.seed}:{epoch}").shuffle(steps)
        first = sorted(order[:head], key=lambda i: -lengths[i])
        return first + [i for step in steps for i in step] + tail

    def next_batch(self, k: int) -> list[int]:
        """The next `k` prompt indices (k may exceed n: the batch then spans epochs)."""
        if k < 1:
            raise MinioprdError(f"batch size must be >= 1, got {k}")
        batch: list[int] = []
        while len(batch) < k:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(k - len(batch), self.n - self.position)
            batch.extend(self._order[self.position:self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: JSON-serialisable, a few integers (the lengths come from the data)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n,
                "shuffle": self.shuffle, "group": self.group}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; the prompt set and length grouping must be the ones it was saved with."""
        n = int(d.get("n", self.n))
        if n != self.n:
            raise MinioprdError(f"the checkpoint's prompt order is for {n} prompts but the data set now has "
                                f"{self.n}; resume with the same data settings (data.dataset, data.max_prompts, "
                                f"data.max_prompt_tokens)")
        group = int(d.get("group", 0))  # absent: saved before length grouping existed, so it was off
        if group != self.group:
            def says(g: int) -> str:
                return f"on, {g} prompts per step" if g else "off"
            raise MinioprdError(f"the checkpoint's prompt order was drawn with length grouping {says(group)} but "
                                f"this run has it {says(self.group)}; resume with the same rollout.sort_by_length "
                                f"and rollout.prompts_per_step")
        self.seed = int(d["seed"])
        self.shuffle = bool(d.get("shuffle", self.shuffle))
        self.epoch, self.position = int(d["epoch"]), int(d["position"])
        self._order = self._permutation(self.epoch)
