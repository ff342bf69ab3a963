"""Datasets to tokenised, loss-masked, bucketed (or packed) training batches.

Three row shapes are recognised, by their fields:

- ``text``: plain text; every token is trained on.
- ``prompt`` + ``completion``: the loss covers the completion (and the end-of-sequence token)
  only, unless ``completion_only=False``.
- ``messages``: a chat (``[{"role", "content"}, ...]``) rendered with the tokenizer's chat
  template; the loss covers the assistant turns only, unless ``completion_only=False``.

Rows that cannot be used (a JSONL line that is not JSON or not UTF-8, missing fields, values
of the wrong type, empty text, a chat the template refuses, longer than ``max_length``) are
never dropped silently: :func:`tokenize` reports each with its row number and, with
``on_bad_row="skip"`` (the default), leaves it out; ``"error"`` raises instead.

Batches have a bounded number of shapes, so a jitted step compiles a bounded number of times:
lengths are padded up to a bucket (a multiple of ``bucket`` tokens), or several short examples
are packed into one row with ``segment_ids`` keeping their attention apart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jpeft import train

_log = logging.getLogger(__name__)
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A dataset row or file that cannot be used, named with its row number."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    """A row of a file that could not be read as a row (e.g. a JSONL line that is not JSON);
    :func:`tokenize` reports it under its row number."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenised example: ``input_ids`` and ``labels`` (IGNORE_INDEX where untrained)."""

    input_ids: list[int]
    labels: list[int]


def load_rows(source: str | os.PathLike, split: str = "train") -> list[dict | BadRow]:
    """Rows of a local JSONL, JSON, CSV or Parquet file, or of a Hugging Face Hub dataset name
    where the network allows it.

    A JSONL file is read line by line: a line that is not UTF-8 or not JSON becomes a
    :class:`BadRow` at its place (row ``n`` is line ``n + 1``; blank lines count), so one bad
    line costs one row, not the file. Other formats are read through :mod:`datasets`.
    """
    import datasets

    path = Path(source)
    if path.suffix in _FORMATS:
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        if path.suffix == ".jsonl":
            return _jsonl_rows(path)
        try:
            dataset = datasets.load_dataset(
                _FORMATS[path.suffix], data_files=str(path), split="train"
            )
        except Exception as err:  # datasets raises many types for a malformed file
            raise DataError(f"{path} could not be read as {_FORMATS[path.suffix]}: {err}") from err
    else:
        dataset = datasets.load_dataset(str(source), split=split)
    return list(dataset)


def _jsonl_rows(path: Path) -> list[dict | BadRow]:
    with open(path, "rb") as file:
        lines = file.read().split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the newline that ends the last line
    return [_jsonl_row(line) for line in lines]


def _jsonl_row(line: bytes) -> dict | BadRow:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRow(f"not valid UTF-8 (byte {err.start})")
    if not text.strip():
        return BadRow("an empty line")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return BadRow(f"not JSON: {err.msg} (column {err.colno})")


def tokenize(
    rows: Sequence[dict],
    tokenizer: Any,
    *,
    max_length: int = 512,
    completion_only: bool = True,
    on_bad_row: str = "skip",
) -> tuple[list[Example], list[str]]:
    """Tokenises rows into examples with loss masks.

    Args:
      rows: dicts in one of the three shapes (see the module docstring), as from
        :func:`load_rows`; anything else (a :class:`BadRow`, a list, None) is a bad row.
      tokenizer: a transformers tokenizer (with a chat template for ``messages`` rows).
      max_length: the longest example kept, in tokens.
      completion_only: train on completions / assistant turns only.
      on_bad_row: ``"skip"`` (report and leave out) or ``"error"`` (raise :class:`DataError`).

    Returns:
      ``(examples, problems)``: the usable examples and one message per bad row.
    """
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    examples, problems = [], []
    for number, row in enumerate(rows):
        try:
            example = _tokenize_row(row, tokenizer, completion_only)
            if not example.input_ids:
                raise DataError("no tokens")
            if len(example.input_ids) > max_length:
                raise DataError(f"{len(example.input_ids)} tokens, over max_length {max_length}")
            if all(label == train.IGNORE_INDEX for label in example.labels[1:]):
                raise DataError("no token to train on")
        except DataError as err:
            message = f"row {number}: {err}"
            if on_bad_row == "error":
                raise DataError(message) from None
            problems.append(message)
            _log.warning("skipping %s", message)
            continue
        examples.append(example)
    return examples, problems


def _tokenize_row(row: Any, tokenizer: Any, completion_only: bool) -> Example:
    if isinstance(row, BadRow):
        raise DataError(row.reason)
    if not isinstance(row, dict):
        raise DataError(f"a row must be an object with fields, got {type(row).__name__}")
    try:
        return _tokenize_fields(row, tokenizer, completion_only)
    except DataError:
        raise
    except Exception as err:  # the tokenizer or chat template refused a value (e.g. a lone
        # surrogate, a template's raise_exception): the row is bad, the run goes on
        raise DataError(f"could not be tokenised: {type(err).__name__}: {err}") from err


def _tokenize_fields(row: dict, tokenizer: Any, completion_only: bool) -> Example:
    if "messages" in row:
        return _chat(row["messages"], tokenizer, completion_only)
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(
                f"prompt and completion must be strings, got {type(prompt).__name__} and "
                f"{type(completion).__name__}"
            )
        if not completion.strip():
            raise DataError("empty completion")
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        completion_ids = completion_ids + _eos(tokenizer)
        ignored = [train.IGNORE_INDEX] * len(prompt_ids) if completion_only else prompt_ids
        return Example(prompt_ids + completion_ids, ignored + completion_ids)
    if "text" in row:
        text = row["text"]
        if not isinstance(text, str):
            raise DataError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError("empty text")
        ids = tokenizer(text)["input_ids"] + _eos(tokenizer)
        return Example(ids, list(ids))
    raise DataError(f"no 'text', 'prompt'/'completion' or 'messages' field (fields: {list(row)})")


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _chat(messages: Any, tokenizer: Any, completion_only: bool) -> Example:
    """Renders a chat; assistant turns are found by rendering each prefix of the chat."""
    if not isinstance(messages, list) or not messages:
        raise DataError("messages must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError("each message needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(
                f"a message's role and content must be strings, got {type(role).__name__} "
                f"and {type(content).__name__}"
            )
        if not content.strip():
            raise DataError(f"empty {role} message")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant message to train on")

    def render(turns, generation_prompt=False):
        text = tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = render(messages)
    labels = [train.IGNORE_INDEX] * len(ids) if completion_only else list(ids)
    if completion_only:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(render(messages[:i], generation_prompt=True))
            end = len(render(messages[: i + 1]))
            labels[start:end] = ids[start:end]
    return Example(ids, labels)


def batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    pad_id: int,
    bucket: int = 64,
    pack: bool = False,
    shuffle_seed: int | None = 0,
    epochs: int | None = 1,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``{"input_ids", "attention_mask", "labels"[, "segment_ids"]}``, ``[b, t]``.

    Args:
      examples: from :func:`tokenize`.
      batch_size: rows per batch (the last incomplete batch of an epoch is dropped).
      pad_id: the padding token id.
      bucket: lengths are padded up to a multiple of this; with `pack`, the row length.
      pack: concatenate short examples into rows of `bucket` tokens with ``segment_ids``
        (padding-free: attention does not cross example boundaries).
      shuffle_seed: the order of examples, reshuffled each epoch (None keeps the order).
      epochs: passes over the data (None: forever).
      start: batches to skip, to resume a run where it stopped (the data position).
    """
    if batch_size < 1 or bucket < 1:
        raise ValueError(f"batch_size and bucket must be positive, got {batch_size}, {bucket}")
    if not examples:
        raise DataError("no examples to batch")
    rows = _packed_rows(examples, bucket) if pack else [[e] for e in examples]
    if len(rows) < batch_size:
        raise DataError(f"{len(rows)} rows cannot fill one batch of {batch_size}")
    per_epoch = len(rows) // batch_size
    epoch = start // per_epoch
    skip = start % per_epoch
    while epochs is None or epoch < epochs:
        order = np.arange(len(rows))
        if shuffle_seed is not None:
            order = np.random.default_rng([shuffle_seed, epoch]).permutation(len(rows))
        for i in range(skip, per_epoch):
            chosen = [rows[j] for j in order[i * batch_size : (i + 1) * batch_size]]
            yield _collate(chosen, pad_id, bucket, pack)
        skip, epoch = 0, epoch + 1


def _packed_rows(examples: Sequence[Example], length: int) -> list[list[Example]]:
    """Greedy first-fit packing of examples into rows of at most `length` tokens."""
    rows: list[list[Example]] = []
    space: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e.input_ids)):
        size = len(example.input_ids)
        if size > length:
            raise DataError(f"an example of {size} tokens does not fit a packed row of {length}")
        for i, free in enumerate(space):
            if size <= free:
                rows[i].append(example)
                space[i] -= size
                break
        else:
            rows.append([example])
            space.append(length - size)
    return rows


def _collate(rows: list[list[Example]], pad_id: int, bucket: int, pack: bool) -> dict:
    longest = max(sum(len(e.input_ids) for e in row) for row in rows)
    width = bucket if pack else -(-longest // bucket) * bucket
    batch = {
        "input_ids": np.full((len(rows), width), pad_id, np.int32),
        "attention_mask": np.zeros((len(rows), width), np.int32),
        "labels": np.full((len(rows), width), train.IGNORE_INDEX, np.int32),
    }
    if pack:
        batch["segment_ids"] = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        offset = 0
        for s, example in enumerate(row):
            n = len(example.input_ids)
            batch["input_ids"][r, offset : offset + n] = example.input_ids
            batch["attention_mask"][r, offset : offset + n] = 1
            labels = list(example.labels)
            labels[0] = train.IGNORE_INDEX  # never predict a token across examples
            batch["labels"][r, offset : offset + n] = labels
            if pack:
                batch["segment_ids"][r, offset : offset + n] = s + 1
            offset += n
    return batch
