"""Data: the three row shapes, loss masks, bad rows, bucketing, packing, resuming."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_models
import jpeft
from jpeft import data, train

CHAT = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_file):
    return jpeft.models.load_tokenizer(smollm2_file)


def _trained_text(tokenizer, example):
    return tokenizer.decode([t for t, l in zip(example.input_ids, example.labels)
                             if l != train.IGNORE_INDEX])


def test_row_shapes_and_loss_masks(tokenizer):
    rows = [{"text": "plain words"}, {"prompt": "Q: 2+2? A:", "completion": " 4"},
            {"messages": CHAT + [{"role": "user", "content": "Again."},
                                 {"role": "assistant", "content": "Hello!"}]}]
    (text, completion, chat), problems = data.tokenize(rows, tokenizer)
    assert problems == []
    assert text.labels == text.input_ids
    assert _trained_text(tokenizer, completion) == " 4" + tokenizer.eos_token
    trained = _trained_text(tokenizer, chat)
    assert "Hi there!" in trained and "Hello!" in trained
    assert "Say hi" not in trained and "Again" not in trained and "user" not in trained
    (full,), _ = data.tokenize(rows[2:], tokenizer, completion_only=False)
    assert full.labels == full.input_ids


def test_bad_rows_are_reported_with_their_number(tokenizer):
    rows = [{"text": "fine"}, {"text": "   "}, {"other": 1}, {"messages": [CHAT[0]]},
            {"text": "word " * 600}, {"prompt": "p", "completion": ""}]
    examples, problems = data.tokenize(rows, tokenizer, max_length=256)
    assert len(examples) == 1
    assert [p.split(":")[0] for p in problems] == ["row 1", "row 2", "row 3", "row 4", "row 5"]
    assert "empty text" in problems[0] and "over max_length 256" in problems[3]
    with pytest.raises(data.DataError, match="row 1: empty text"):
        data.tokenize(rows, tokenizer, on_bad_row="error")


# Rows as users' files hold them, and worse: wrong types, missing keys, empty and
# whitespace-only strings, lone surrogates (text that is not valid Unicode), nested junk.
_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                  max_size=3),
    max_leaves=5,
)
_TEXT = st.text(st.characters(exclude_categories=()), max_size=40) | st.sampled_from(
    ["", "   ", "\n", "ok", "\x00", "<|im_end|>", "{{ raise_exception('x') }}"])
_VALUE = _TEXT | _JUNK
_MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "tool"]) | _VALUE,
    "content": _VALUE,
}) | _JUNK
_ROW = st.one_of(
    st.fixed_dictionaries({"text": _VALUE}),
    st.fixed_dictionaries({"prompt": _VALUE, "completion": _VALUE}),
    st.fixed_dictionaries({"completion": _VALUE}),
    st.fixed_dictionaries({"messages": st.lists(_MESSAGE, max_size=4) | _VALUE}),
    st.dictionaries(st.text(max_size=8), _VALUE, max_size=3),
    _JUNK,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(_ROW, min_size=1, max_size=6))
def test_generated_rows_are_used_or_reported_by_number(tokenizer, rows):
    examples, problems = data.tokenize(rows, tokenizer, max_length=256)
    numbers = [int(p.split(":")[0].removeprefix("row ")) for p in problems]
    assert len(examples) + len(problems) == len(rows)
    assert numbers == sorted(set(numbers)) and all(0 <= n < len(rows) for n in numbers)
    for example in examples:
        assert 0 < len(example.input_ids) == len(example.labels) <= 256
        assert any(label != train.IGNORE_INDEX for label in example.labels[1:])
    if problems:
        with pytest.raises(data.DataError, match=rf"^row {numbers[0]}: "):
            data.tokenize(rows, tokenizer, max_length=256, on_bad_row="error")
    else:
        assert data.tokenize(rows, tokenizer, max_length=256, on_bad_row="error")[0] == examples


def test_a_jsonl_file_with_bad_lines_loses_only_those_rows(tokenizer, tmp_path):
    lines = [
        json.dumps({"text": "a good row"}).encode(),
        b'{"text": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"text": "unterminated',
        b"",
        json.dumps([1, 2]).encode(),
        json.dumps({"text": 7}).encode(),
        json.dumps({"text": "word " * 50_000}).encode(),  # a huge string
        json.dumps({"prompt": "p", "completion": "another good row"}).encode(),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = data.load_rows(path)
    assert len(rows) == len(lines)
    examples, problems = data.tokenize(rows, tokenizer, max_length=256)
    assert len(examples) == 2
    assert problems == [
        "row 1: not valid UTF-8 (byte 13)",
        "row 2: not JSON: Unterminated string starting at (column 10)",
        "row 3: an empty line",
        "row 4: a row must be an object with fields, got list",
        "row 5: text must be a string, got int",
        problems[5],
    ]
    assert problems[5].startswith("row 6: ") and "over max_length 256" in problems[5]


def test_local_files_of_every_format(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    import pandas

    pandas.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        assert data.load_rows(tmp_path / name) == rows
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_rows(tmp_path / "missing.jsonl")


def _examples(lengths):
    return [data.Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in lengths]


def test_bucketing_bounds_the_shapes():
    examples = _examples([3, 9, 17, 30, 31, 40, 63, 64, 65, 5])
    shapes = {b["input_ids"].shape for b in data.batches(examples, 2, pad_id=0, bucket=32,
                                                          epochs=3)}
    assert shapes <= {(2, 32), (2, 64), (2, 96)}
    batch = next(data.batches(examples, 2, pad_id=0, bucket=32, shuffle_seed=None))
    assert batch["attention_mask"][0].sum() == 3 and batch["labels"][0, 3] == train.IGNORE_INDEX


def test_resuming_at_a_data_position_continues_the_same_stream():
    examples = _examples(range(1, 23))
    stream = list(data.batches(examples, 4, pad_id=0, bucket=8, epochs=3))
    resumed = list(data.batches(examples, 4, pad_id=0, bucket=8, epochs=3, start=7))
    assert len(resumed) == len(stream) - 7
    for a, b in zip(stream[7:], resumed):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_packing_keeps_examples_apart(tmp_path):
    hf_models.make("llama", tmp_path)
    model, params = jpeft.models.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    examples = [data.Example(list(ids), list(ids))
                for ids in (rng.integers(1, 97, n) for n in (5, 7, 3, 9, 4, 6))]
    batch = next(data.batches(examples, 2, pad_id=0, bucket=16, pack=True, shuffle_seed=None))
    assert batch["input_ids"].shape == (2, 16) and batch["segment_ids"].max() >= 2
    logits = np.asarray(model(params, batch["input_ids"], attention_mask=batch["attention_mask"],
                              segment_ids=batch["segment_ids"]))
    row, seg = batch["input_ids"][0], batch["segment_ids"][0]
    for s in set(seg[seg > 0]):
        ids = row[seg == s]
        alone = np.asarray(model(params, ids[None]))[0]
        np.testing.assert_allclose(logits[0][seg == s], alone, atol=1e-5)
    loss_sum, tokens = train.causal_lm_loss(model, params, batch)
    segments = batch["segment_ids"]
    sizes = [int((segments[r] == s).sum()) for r in range(2) for s in set(segments[r][segments[r] > 0])]
    assert float(tokens) == sum(n - 1 for n in sizes)  # no label predicts across examples
    assert np.isfinite(float(jax.device_get(loss_sum)))
