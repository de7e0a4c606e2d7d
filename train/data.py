"""SQuAD-format data: loading + validation, the seeds' prompt, tokenisation, fixed-shape batches.

Sources (`load_split`):
  * `"squad"` / `"squad_v2"`: the Hugging Face datasets via `datasets.load_dataset` (need the hub);
  * a SQuAD v1.1 / v2.0 JSON file `{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
    "question", "answers": [{"text", "answer_start"}]}]}]}]}`;
  * a flat JSON list / JSONL file of records `{"id", "context", "question", "answers"}` with
    HF-style answers `{"text": [...], "answer_start": [...]}` (or a list of `{"text",
    "answer_start"}` dicts);
  * a directory holding `train.json` / `validation.json` (or `.jsonl`, or SQuAD's own
    `train-v1.1.json` / `dev-v1.1.json`).

Malformed records are skipped and counted by reason (`SKIP_REASONS`), never fatal; a file that is
not SQuAD-shaped at all raises one `ValueError` naming the path and the expected layout.

SQuAD v2.0 adds unanswerable questions: a record with `"is_impossible": true` (the official
files, whose `"version"` is "v2.0"), or, in v2.0 data (`squad_v2`, such a file, or `v2=True`),
one with no answer, becomes a `QARecord` with no answers; its target is EOS alone (the empty
answer), and it is scored by the v2.0 rules (`train.metrics`). In v1.1 data a record without an
answer stays a malformed one (`no_answer`).

Tokens: `CONTEXT\\n{context}\\n\\nQUESTION\\n{question}\\n\\nANSWER\\n` (or any `PromptTemplate`) then
`{answer}` + EOS. The pieces are tokenised separately (header, context, question tail, answer) so train and eval
prompts are token-identical and the context can be cut at token boundaries. When an example is
longer than `max_len`, context tokens are removed from the side(s) far from the gold answer,
keeping a window centred on it. Eval prompts are cut the same way by default (`window="answer"`):
the gold position only chooses which part of an over-long context the model sees, as is standard
for fixed-window extractive evaluation; `window="start"` keeps the beginning instead (no gold
information at all, but the answer may be cut away).

Batches (all numpy, fixed shapes: rows = `batch_size`, length = the smallest bucket that fits):
  train: `input_ids` int32 [B, T], `attention_mask` int32 [B, T], `labels` int32 [B, T] (already
    shifted: `labels[:, t]` is the token after `input_ids[:, t]`), `loss_mask` float32 [B, T]
    (1 where `labels[:, t]` is a target, aligned with the logits at position t). Right-padded.
  eval: `input_ids` int32 [B, T] left-padded prompts, `attention_mask` int32 [B, T],
    `position_ids` int32 [B, T], `ids` list[str] (`""` on filler rows), `valid` bool [B].
Filler rows (to complete the last batch) have `loss_mask == 0` / `valid == False`, so no attention
row is fully masked (which can give NaNs): in training an all-ones attention mask, in eval one
real token (the last), which leaves every position for the new tokens of the real rows.

Packing (`pack`, as TRL's `packing=True`, with no attention across examples): training examples side by
side in rows of `max_len` tokens, each row's batch entry then also holding `segment_ids` int32
[B, T] (the examples numbered 1, 2, ... in the row, 0 for padding; `CausalLM.apply(...,
segment_ids=)`), and `attention_mask` = `segment_ids > 0`. Every example keeps its own positions
and sees only itself, so its loss terms are those of its unpacked row; fewer pad slots are computed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np

PROMPT_TEMPLATE = "CONTEXT\n{context}\n\nQUESTION\n{question}\n\nANSWER\n"  # the seeds' prompt

HF_DATASET_NAMES = ("squad", "rajpurkar/squad", "squad_v2", "rajpurkar/squad_v2")
HF_V2_NAMES = ("squad_v2", "rajpurkar/squad_v2")
SKIP_REASONS = (
    "malformed",  # not a dict, a field missing or of the wrong type, broken JSON line
    "empty_context",
    "empty_question",
    "no_answer",  # no answer given, or only empty answer texts (v1.1 data; v2.0 keeps them as unanswerable)
    "answer_not_in_context",  # no answer text occurs in the context
    "duplicate_id",  # ids key the predictions, so a repeated id would collide
)
_EXPECTED_LAYOUT = (
    'a SQuAD v1.1 / v2.0 JSON object {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", '
    '"question", "answers": [{"text", "answer_start"}]}]}]}]}, or a JSON list / JSONL file of '
    'records {"id", "context", "question", "answers": {"text": [...], "answer_start": [...]}}'
)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class QARecord:
    """One question with its gold answers; every answer is `context[start:start+len(text)]`.
    No answers: an unanswerable SQuAD v2.0 question, whose right answer is the empty one."""

    id: str
    context: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]

    @property
    def answerable(self) -> bool:
        return bool(self.answers)


@dataclass(frozen=True)
class LoadResult:
    """Valid records plus what was dropped (`skipped`: reason -> count) or fixed.

    `repaired` counts answers whose `answer_start` was wrong but whose text occurs in the
    context; they are kept with the start of the nearest occurrence. `dropped_answers` counts
    gold answers of kept records whose text is nowhere in the context (left out, scoring too).
    """

    records: tuple[QARecord, ...]
    skipped: Mapping[str, int]
    repaired: int = 0
    dropped_answers: int = 0
    v2: bool = False  # SQuAD v2.0 data (asked for, said by the source, or holding unanswerable questions)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def unanswerable(self) -> int:
        """SQuAD v2.0 questions without an answer among the records."""
        return sum(not r.answerable for r in self.records)


class _Tally:
    """Mutable counters used while parsing; frozen into a LoadResult at the end."""

    def __init__(self, v2: bool = False) -> None:
        self.v2 = v2  # SQuAD v2.0: a question without an answer is unanswerable, not malformed
        self.records: list[QARecord] = []
        self.skipped: Counter[str] = Counter()
        self.repaired = 0
        self.dropped_answers = 0
        self.seen_ids: set[str] = set()

    def result(self) -> LoadResult:
        v2 = self.v2 or any(not r.answerable for r in self.records)
        return LoadResult(tuple(self.records), {r: self.skipped[r] for r in SKIP_REASONS}, self.repaired,
                          dropped_answers=self.dropped_answers, v2=v2)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _answer_pairs(answers: Any) -> list[tuple[Any, Any]] | None:
    """(text, start) pairs from HF-style or SQuAD-style answers; None when malformed."""
    if isinstance(answers, Mapping):
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, (list, tuple)):
            return None
        if starts is None:
            starts = [None] * len(texts)
        if not isinstance(starts, (list, tuple)) or len(starts) != len(texts):
            return None
        return list(zip(texts, starts))
    if isinstance(answers, (list, tuple)):
        pairs = []
        for a in answers:
            if not isinstance(a, Mapping):
                return None
            pairs.append((a.get("text"), a.get("answer_start")))
        return pairs
    return None


def _locate(context: str, text: str, start: Any) -> int | None:
    """Start of `text` in `context`: the given start if it matches, else the nearest hit."""
    if _is_int(start) and 0 <= start and context[start : start + len(text)] == text:
        return int(start)
    hits, i = [], context.find(text)
    while i != -1:
        hits.append(i)
        i = context.find(text, i + 1)
    if not hits:
        return None
    anchor = int(start) if _is_int(start) else 0
    return min(hits, key=lambda h: (abs(h - anchor), h))


def _add_record(tally: _Tally, obj: Any) -> None:
    """Validate one flat record and add it to the tally (or count why it was skipped)."""
    if not isinstance(obj, Mapping):
        tally.skipped["malformed"] += 1
        return
    rid, context, question = obj.get("id"), obj.get("context"), obj.get("question")
    pairs = _answer_pairs(obj.get("answers"))
    if not (isinstance(rid, str) or _is_int(rid)) or not isinstance(context, str) \
            or not isinstance(question, str) or pairs is None \
            or any(not isinstance(t, str) for t, _ in pairs):
        tally.skipped["malformed"] += 1
        return
    rid = str(rid)
    if not rid:  # "" marks filler rows in eval batches
        tally.skipped["malformed"] += 1
        return
    if not context.strip():
        tally.skipped["empty_context"] += 1
        return
    if not question.strip():
        tally.skipped["empty_question"] += 1
        return
    pairs = [(t, s) for t, s in pairs if t.strip()]
    unanswerable = obj.get("is_impossible") is True or (tally.v2 and not pairs)  # SQuAD v2.0: no answers
    if not pairs and not unanswerable:
        tally.skipped["no_answer"] += 1
        return
    answers, starts, repaired = [], [], 0
    for text, start in [] if unanswerable else pairs:
        found = _locate(context, text, start)
        if found is None:
            continue
        repaired += found != start
        answers.append(text)
        starts.append(found)
    if not answers and not unanswerable:
        tally.skipped["answer_not_in_context"] += 1
        return
    if rid in tally.seen_ids:
        tally.skipped["duplicate_id"] += 1
        return
    tally.seen_ids.add(rid)
    tally.repaired += repaired
    tally.dropped_answers += 0 if unanswerable else len(pairs) - len(answers)
    tally.records.append(QARecord(rid, context, question, tuple(answers), tuple(starts)))


def _add_article(tally: _Tally, article: Mapping) -> None:
    """Flatten one SQuAD v1.1 article; a broken container counts as one malformed item."""
    paragraphs = article.get("paragraphs")
    if not isinstance(paragraphs, list):
        tally.skipped["malformed"] += 1
        return
    for para in paragraphs:
        if not isinstance(para, Mapping) or not isinstance(para.get("qas"), list):
            tally.skipped["malformed"] += 1
            continue
        for qa in para["qas"]:
            if isinstance(qa, Mapping):
                qa = {**qa, "context": para.get("context")}
            _add_record(tally, qa)


def _looks_like_squad(item: Any) -> bool:
    return isinstance(item, Mapping) and ("paragraphs" in item or ("context" in item and "question" in item))


def parse_records(items: Iterable[Any], *, v2: bool = False) -> LoadResult:
    """Validate SQuAD articles and/or flat records; never raises on bad items.

    Args:
        items: SQuAD v1.1 / v2.0 articles (dicts with "paragraphs") and/or flat records.
        v2: SQuAD v2.0 data: a question without an answer is unanswerable (kept, with no
            answers), not malformed. `"is_impossible": true` says so in any case.

    Returns:
        A LoadResult; `len(records) + num_skipped` equals the number of flat records given
        (a broken article or paragraph counts as one "malformed").
    """
    tally = _Tally(v2)
    for item in items:
        if isinstance(item, Mapping) and "paragraphs" in item:
            _add_article(tally, item)
        else:
            _add_record(tally, item)
    return tally.result()


# ----------------------------------------------------------------------------- sources


def _read_items(path: Path) -> tuple[list[Any], int, bool]:
    """The top-level items of a JSON / JSONL file, the number of unparseable JSONL lines, and
    whether the file says it is SQuAD v2 (`"version": "v2.0"`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        top = json.loads(text)
    except json.JSONDecodeError:
        top, items, bad = None, [], 0
        for line in text.splitlines():
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
        if not items:
            raise ValueError(f"{path}: not JSON or JSONL; expected {_EXPECTED_LAYOUT}") from None
        return items, bad, False
    if isinstance(top, Mapping) and isinstance(top.get("data"), list):
        return top["data"], 0, str(top.get("version", "")).lstrip("v").startswith("2")
    if isinstance(top, list):
        return top, 0, False
    if isinstance(top, Mapping) and _looks_like_squad(top) and "data" not in top:
        return [top], 0, False  # a JSONL file of one record
    kind = f"a JSON object with keys {sorted(top)[:8]}" if isinstance(top, Mapping) else f"a JSON {type(top).__name__}"
    raise ValueError(f"{path}: found {kind}; expected {_EXPECTED_LAYOUT}")


def load_squad_file(path: str | Path, *, v2: bool = False) -> LoadResult:
    """Load and validate a local SQuAD v1.1 / v2.0 JSON or flat JSON/JSONL file (v2.0 rules when
    `v2` or the file's `"version"` says 2).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file is not SQuAD-shaped, or holds no valid record at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD data file not found: {path}")
    items, bad_lines, file_v2 = _read_items(path)
    if not any(_looks_like_squad(it) for it in items):
        raise ValueError(f"{path}: no SQuAD article or record found; expected {_EXPECTED_LAYOUT}")
    result = parse_records(items, v2=v2 or file_v2)
    if bad_lines:
        skipped = dict(result.skipped)
        skipped["malformed"] += bad_lines
        result = dataclasses.replace(result, skipped=skipped)
    if not result.records:
        raise ValueError(f"{path}: no valid question-answer record (skipped: {dict(result.skipped)})")
    return result


def load_hf_squad(split: str, name: str = "squad", *, v2: bool = False) -> LoadResult:
    """Load a split of the Hugging Face SQuAD dataset (needs the hub or a warm cache); `squad_v2`
    (or `v2`) keeps its unanswerable questions."""
    import datasets  # imported lazily: slow to import and only needed online

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many types (connection, auth, missing split)
        raise RuntimeError(
            f"could not load {name!r} split {split!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Pass --data PATH to a local SQuAD file, or omit --data for the embedded offline world set."
        ) from e
    return parse_records(ds, v2=v2 or name in HF_V2_NAMES)


_SPLIT_FILES = {
    "train": ("train.json", "train.jsonl", "train-v1.1.json", "train-v2.0.json"),
    "validation": ("validation.json", "validation.jsonl", "dev.json", "dev.jsonl", "dev-v1.1.json", "dev-v2.0.json"),
}


def resolve_split_path(data: str | Path, split: str) -> Path:
    """The file for `split` in a data directory (a file path is returned as is)."""
    path = Path(data)
    if path.is_file():
        return path
    if path.is_dir():
        for name in _SPLIT_FILES.get(split, (f"{split}.json", f"{split}.jsonl")):
            if (path / name).is_file():
                return path / name
        names = _SPLIT_FILES.get(split, (f"{split}.json",))
        raise FileNotFoundError(f"{path}: no file for split {split!r}; looked for {', '.join(names)}")
    raise FileNotFoundError(
        f"SQuAD data not found: {path} (expected 'squad' for the Hugging Face dataset, "
        "a SQuAD JSON/JSONL file, or a directory with train.json and validation.json)"
    )


def load_split(data: str | Path, split: str, *, v2: bool = False) -> LoadResult:
    """Load `split` ("train" / "validation") from `"squad"` / `"squad_v2"` (the hub), a directory
    or a file; `v2`: SQuAD v2.0 rules (see the module docstring) whatever the source says.

    A single file serves whichever split is asked for. Existing local paths win over the hub
    names, so a directory called `squad` is read from disk.
    """
    if not Path(data).exists() and str(data) in HF_DATASET_NAMES:
        return load_hf_squad(split, name=str(data), v2=v2)
    return load_squad_file(resolve_split_path(data, split), v2=v2)


# ----------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt holding `{context}` and `{question}` once each, in either order (str.format syntax:
    `{{` / `}}` are literal braces); the model continues it with the answer and EOS.

    The text before the context, the context and the text after it are tokenised apart, so a
    context can be cut at token boundaries and train and eval prompts are token-identical; pieces
    that meet the context at a newline tokenise as the whole prompt would."""

    text: str = PROMPT_TEMPLATE

    def __post_init__(self) -> None:
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(self.text) if f is not None]
        except ValueError as e:
            raise ValueError(f"prompt template {self.text!r}: {e}") from None
        names = sorted(f for f, _, _ in fields)
        if names != ["context", "question"] or any(spec or conv for _, spec, conv in fields) or \
                self.text.count("{context}") != 1:  # (a literal "{{context}}" would blur where the context goes)
            raise ValueError(f"prompt template {self.text!r} must hold {{context}} and {{question}} once each and no "
                             f"other field, got {[f for f, _, _ in fields]}")

    @property
    def head(self) -> str:
        """The format string before `{context}` (may hold `{question}`)."""
        return self.text.split("{context}")[0]

    @property
    def tail(self) -> str:
        """The format string after `{context}` (may hold `{question}`)."""
        return self.text.split("{context}")[1]

    @property
    def marker(self) -> str:
        """What every prompt ends with, after the last field (--alora's invocation; may be empty)."""
        after = ""
        for literal, field, _, _ in string.Formatter().parse(self.text):  # `{{` splits a literal in two
            after = after + literal if field is None else ""
        return after

    def format(self, context: str, question: str) -> str:
        return self.text.format(context=context, question=question)


ANSWER_MARKER = PromptTemplate().marker  # "\n\nANSWER\n": what the seeds' prompts end with


def format_prompt(context: str, question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt (the seeds' by default); the model continues it with the answer and EOS."""
    return PromptTemplate(template).format(context, question)


@dataclass(frozen=True)
class Encoded:
    """One tokenised example. `tokens[target_start:]` are the loss targets (training only)."""

    id: str
    tokens: np.ndarray  # int32 [n]: prompt (+ answer + EOS when training)
    target_start: int
    truncated: bool

    @property
    def length(self) -> int:
        """Input tokens in a training row: tokens[:-1]."""
        return len(self.tokens) - 1

    @property
    def targets(self) -> int:
        """Loss targets."""
        return len(self.tokens) - self.target_start


@dataclass(frozen=True)
class EncodeResult:
    """Encoded examples, plus examples dropped because even the answer window cannot fit."""

    examples: tuple[Encoded, ...]
    skipped: Mapping[str, int]  # {"too_long": n}
    truncated: int  # examples whose context was cut


def choose_window(n: int, budget: int, span: tuple[int, int] | None) -> tuple[int, int] | None:
    """The [start, end) slice of n context tokens to keep within `budget` tokens.

    Keeps everything when it fits; otherwise a window centred on `span` (or the beginning when
    `span` is None). None when `span` itself is longer than the budget.
    """
    if n <= budget:
        return 0, n
    if span is None:
        return 0, max(budget, 0)
    a0, a1 = span
    if a1 - a0 > budget:
        return None
    start = a0 - (budget - (a1 - a0)) // 2  # equal slack on both sides of the answer...
    start = max(0, min(start, n - budget))  # ...shifted inward at the context's ends
    return start, start + budget


def token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """Indices [i0, i1) of the tokens overlapping characters [start, end)."""
    hit = [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]
    return (hit[0], hit[-1] + 1) if hit else None


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _piece_ids(tokenizer: Any, piece: str, records: Sequence[QARecord]) -> list[list[int]]:
    """A template piece's tokens per record: tokenised once unless it holds the question."""
    if "{question}" in piece:
        return _ids(tokenizer, [piece.format(question=r.question) for r in records])
    return [_ids(tokenizer, [piece.format()])[0]] * len(records)


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (GPT-2 has no pad token)."""
    pid = tokenizer.pad_token_id
    return int(tokenizer.eos_token_id if pid is None else pid)


def encode(
    tokenizer: Any,
    records: Sequence[QARecord],
    max_len: int,
    *,
    train: bool,
    full_sequence_loss: bool = False,
    window: Literal["answer", "start"] = "answer",
    template: str = PROMPT_TEMPLATE,
) -> EncodeResult:
    """Tokenise records into training sequences (prompt + answer + EOS) or eval prompts.

    Args:
        tokenizer: a transformers fast tokenizer (offset mappings are needed).
        records: validated records; training uses the first gold answer (an unanswerable one:
            the empty answer, EOS alone).
        max_len: the most tokens per example (training: prompt + answer + EOS; eval: prompt).
        train: append the answer and EOS, and mark the targets.
        full_sequence_loss: targets are every token after the first, not just answer + EOS.
        window: how to cut an over-long eval context: around the gold answer, or keep its
            start. Training always keeps the window around the answer.
        template: the prompt (`PromptTemplate`; the seeds' by default).

    Returns:
        An EncodeResult; examples that cannot fit even with the context cut to the answer are
        counted under `skipped["too_long"]`.
    """
    contexts = list(dict.fromkeys(r.context for r in records))  # SQuAD shares contexts
    ctx_enc = tokenizer(contexts, add_special_tokens=False, return_offsets_mapping=True) if contexts else None
    ctx_of = {c: (ctx_enc["input_ids"][i], ctx_enc["offset_mapping"][i]) for i, c in enumerate(contexts)}
    tpl = PromptTemplate(template)
    heads, tails = (_piece_ids(tokenizer, piece, records) for piece in (tpl.head, tpl.tail))
    answers = _ids(tokenizer, [r.answers[0] if r.answerable else "" for r in records]) if train \
        else [[]] * len(records)
    eos = [int(tokenizer.eos_token_id)] if train else []

    out, too_long, n_truncated = [], 0, 0
    for rec, head, tail, ans in zip(records, heads, tails, answers):
        ctx_ids, offsets = ctx_of[rec.context]
        span = None  # keep the context's start: no answer to centre on, or window="start"
        if rec.answerable and (train or window == "answer"):
            start = rec.answer_starts[0]
            span = token_span(offsets, start, start + len(rec.answers[0]))
        budget = max_len - len(head) - len(tail) - len(ans) - len(eos)
        win = choose_window(len(ctx_ids), budget, span) if budget > 0 else None
        if win is None:
            too_long += 1
            continue
        prompt = head + ctx_ids[win[0] : win[1]] + tail
        tokens = np.asarray(prompt + ans + eos, dtype=np.int32)
        truncated = win != (0, len(ctx_ids))
        n_truncated += truncated
        target_start = (1 if full_sequence_loss else len(prompt)) if train else len(tokens)
        out.append(Encoded(rec.id, tokens, target_start, truncated))
    return EncodeResult(tuple(out), {"too_long": too_long}, n_truncated)


# ----------------------------------------------------------------------------- batches


def bucket_lengths(max_len: int, min_len: int = 32, step: int | None = None) -> tuple[int, ...]:
    """Padded lengths: `min_len` doubling (or growing by `step`) below `max_len`, then `max_len`.

    Each bucket is one compiled shape per batch size; doubling keeps their number logarithmic,
    a `step` (e.g. 64) trades a few more compilations for less padding.
    """
    out, b = [], min_len
    while b < max_len:
        out.append(b)
        b = b + step if step else b * 2
    return tuple(out) + (max_len,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length` tokens."""
    for b in sorted(buckets):
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


@dataclass(frozen=True)
class Packed:
    """Training examples that share one row (`pack`), in order."""

    examples: tuple[Encoded, ...]

    @property
    def length(self) -> int:
        """The row's input tokens."""
        return sum(e.length for e in self.examples)

    @property
    def targets(self) -> int:
        """The row's loss targets."""
        return sum(e.targets for e in self.examples)


def pack(examples: Sequence[Encoded], row_len: int) -> tuple[Packed, ...]:
    """Examples into rows of at most `row_len` input tokens: best-fit decreasing (the longest
    first, each into the open row it fills most), which leaves few pad slots. Deterministic; every
    example lands in exactly one row, the rows' examples in their original order."""
    if not examples:
        raise ValueError("pack: no examples")
    sizes = [e.length for e in examples]
    if max(sizes) > row_len:
        raise ValueError(f"pack: an example of {max(sizes)} input tokens does not fit rows of {row_len}")
    rows: list[list[int]] = []
    by_space: list[list[int]] = [[] for _ in range(row_len + 1)]  # free slots -> the open rows with that many
    for i in sorted(range(len(examples)), key=lambda i: -sizes[i]):
        space = next((s for s in range(sizes[i], row_len + 1) if by_space[s]), None)
        if space is None:
            r, space = len(rows), row_len
            rows.append([])
        else:
            r = by_space[space].pop()
        rows[r].append(i)
        by_space[space - sizes[i]].append(r)
    return tuple(Packed(tuple(examples[i] for i in sorted(row))) for row in rows)


def make_train_batch(examples: Sequence[Encoded] | Sequence[Packed], batch_size: int, buckets: Sequence[int],
                     pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded, shifted training batch of exactly `batch_size` rows (see module doc); rows of
    `Packed` examples add their `segment_ids`."""
    if not 0 < len(examples) <= batch_size:
        raise ValueError(f"need 1..{batch_size} examples, got {len(examples)}")
    packed = isinstance(examples[0], Packed)
    rows = [u.examples if packed else (u,) for u in examples]
    T = bucket_for(max(u.length for u in examples), buckets)
    input_ids = np.full((batch_size, T), pad_id, np.int32)
    labels = np.full((batch_size, T), pad_id, np.int32)
    attention_mask = np.ones((batch_size, T), np.int32)  # filler rows fully visible: no NaN rows
    loss_mask = np.zeros((batch_size, T), np.float32)
    segment_ids = np.zeros((batch_size, T), np.int32)
    for i, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row, 1):
            n = e.length  # inputs are tokens[:-1], labels tokens[1:]
            input_ids[i, at:at + n] = e.tokens[:-1]
            labels[i, at:at + n] = e.tokens[1:]
            loss_mask[i, at + max(e.target_start - 1, 0) : at + n] = 1.0  # logits at t predict tokens[t+1]
            segment_ids[i, at:at + n] = k
            at += n
        attention_mask[i, at:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "loss_mask": loss_mask}
    if packed:  # a pad (segment 0) sees itself alone: no NaN row either
        batch |= {"segment_ids": segment_ids, "attention_mask": (segment_ids > 0).astype(np.int32)}
    return batch


def make_eval_batch(examples: Sequence[Encoded], batch_size: int, buckets: Sequence[int], pad_id: int) -> dict[str, Any]:
    """Left-padded prompt batch of exactly `batch_size` rows (see module doc)."""
    if not 0 < len(examples) <= batch_size:
        raise ValueError(f"need 1..{batch_size} examples, got {len(examples)}")
    T = bucket_for(max(len(e.tokens) for e in examples), buckets)
    input_ids = np.full((batch_size, T), pad_id, np.int32)
    attention_mask = np.ones((batch_size, T), np.int32)
    for i, e in enumerate(examples):
        n = len(e.tokens)
        input_ids[i, T - n :] = e.tokens
        attention_mask[i, : T - n] = 0
    attention_mask[len(examples):, :-1] = 0  # filler rows: one token, so their positions stay below the real rows'
    position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
    ids = [e.id for e in examples] + [""] * (batch_size - len(examples))
    valid = np.arange(batch_size) < len(examples)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "ids": ids, "valid": valid}


@dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands: batch `index` of `epoch` is the next one served."""

    epoch: int = 0
    index: int = 0

    @classmethod
    def from_step(cls, step: int, batches_per_epoch: int) -> "DataPosition":
        """The position after `step` batches have been consumed from the start."""
        epoch, index = divmod(step, batches_per_epoch)
        return cls(epoch, index)


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch; the last one is completed with filler rows."""
    return math.ceil(num_examples / batch_size)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(
    examples: Sequence[Encoded] | Sequence[Packed],
    *,
    batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
    seed: int,
    start: DataPosition = DataPosition(),
    make_batch: Callable[..., dict[str, np.ndarray]] = make_train_batch,
) -> Iterator[tuple[DataPosition, dict[str, np.ndarray]]]:
    """Endless shuffled training batches (of examples, or of `pack`'s rows), each with the position
    it was taken from; `make_batch(units, batch_size, buckets, pad_id)` builds them (e.g.
    `extractive.make_batch` for span features).

    Resuming at `start` (e.g. `DataPosition.from_step(step, batches_per_epoch(...))`) yields
    exactly the batches an uninterrupted run would have served from there on.
    """
    if not examples:
        raise ValueError("no training examples")
    per_epoch = batches_per_epoch(len(examples), batch_size)
    epoch, index = start.epoch, start.index
    while True:
        order = epoch_order(len(examples), seed, epoch)
        for i in range(index, per_epoch):
            rows = order[i * batch_size : (i + 1) * batch_size]
            yield DataPosition(epoch, i), make_batch([examples[j] for j in rows], batch_size, buckets, pad_id)
        epoch, index = epoch + 1, 0


def eval_batches(
    examples: Sequence[Encoded], *, batch_size: int, buckets: Sequence[int], pad_id: int, sort_by_length: bool = True
) -> Iterator[dict[str, Any]]:
    """Eval prompt batches covering every example once (longest first, to cut padding)."""
    order = sorted(examples, key=lambda e: -len(e.tokens)) if sort_by_length else list(examples)
    for i in range(0, len(order), batch_size):
        yield make_eval_batch(order[i : i + batch_size], batch_size, buckets, pad_id)
