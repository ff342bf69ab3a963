"""Data: the three row shapes, loss masks, bad rows, bucketing, packing, resuming."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

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
