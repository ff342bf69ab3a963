"""``jpeft train --dtype bfloat16`` (with and without ``--activations float32``) and ``--pack``
end to end on the tiny chat model: each
changes what the run computes (not only what it parses), the adapter still trains, and the
adapter is usable afterwards."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from cli_fixtures import make_tiny_chat_model, run

import jpeft
from jpeft import checkpoint, data, train

STEPS = 16
BF16_LOSS_RTOL = 2e-2  # a bfloat16 base (8-bit mantissa) against float32 on one batch
LOSS_FALLS_TO = 0.8  # the mean loss of the last 3 steps against the first 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """``name -> (out folder, metrics records)`` for a float32, a bfloat16, a bfloat16 run
    with float32 activations and a packed run."""
    work = tmp_path_factory.mktemp("runs")
    variants = {
        "float32": [],
        "bfloat16": ["--dtype", "bfloat16"],
        "float32 activations": [
            "--dtype", "bfloat16", "--activations", "float32", "--remat", "save_matmuls"
        ],
        "packed": ["--pack"],
    }  # fmt: skip
    results = {}
    for name, extra in variants.items():
        out = work / name
        code, stdout, stderr = run(
            "train", tiny["model"], "--data", tiny["data"], "--out", out, "--rank", "4",
            "--targets", "all-linear", "--lr", "3e-2", "--batch-size", "4", "--bucket", "64",
            "--max-steps", STEPS, "--no-progress", *extra,
        )  # fmt: skip
        assert code == 0, stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[name] = out, records, stdout
    return results


def _losses(records) -> list[float]:
    return [r["loss"] for r in records]


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float32 activations", "packed"])
def test_the_adapter_trains_and_loads(name, runs, tiny):
    out, records, _ = runs[name]
    losses = _losses(records)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert np.mean(losses[-3:]) < LOSS_FALLS_TO * np.mean(losses[:3]), losses
    model, base = jpeft.models.from_pretrained(tiny["model"])
    params = checkpoint.load_adapter(base, out / "adapter")
    factors = jax.tree.leaves(jpeft.tree.split(params)[0])
    # The adapter is float32 whatever the base's dtype (the help of --dtype says so).
    assert {np.dtype(x.dtype) for x in factors} == {np.dtype("float32")}
    code, stdout, stderr = run(
        "generate", tiny["model"], "--adapter", out / "adapter", "--prompt", "where is the fox",
        "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0 and stdout.strip(), stderr


def test_bfloat16_computes_with_a_bfloat16_base(runs):
    float32 = _losses(runs["float32"][1])[0]
    bfloat16 = _losses(runs["bfloat16"][1])[0]
    # Same data, init and batch: near the float32 loss, but not equal to it, which it would
    # be if --dtype did not reach the weights.
    assert bfloat16 != float32
    np.testing.assert_allclose(bfloat16, float32, rtol=BF16_LOSS_RTOL)


def test_float32_activations_reach_the_computation(runs):
    """Over the same bfloat16 base, float32 activations give another first loss than
    bfloat16 ones, closer to the float32 run's (only the products' inputs are rounded)."""
    float32, bfloat16, wide = (
        _losses(runs[name][1])[0] for name in ("float32", "bfloat16", "float32 activations")
    )
    assert wide != bfloat16
    assert abs(wide - float32) < abs(bfloat16 - float32)


def test_pack_fills_rows_with_several_examples(runs, tiny):
    tokenizer = jpeft.models.load_tokenizer(tiny["model"])
    examples, _ = data.tokenize(data.load_rows(tiny["data"]), tokenizer)
    most = max(sum(label != train.IGNORE_INDEX for label in e.labels) for e in examples)
    packed = [r["tokens"] for r in runs["packed"][1]]  # trained tokens per step
    plain = [r["tokens"] for r in runs["float32"][1]]
    # Four packed rows of 64 tokens hold more examples than four rows of one example each.
    assert min(packed) > 4 * most >= max(plain), (packed, plain, most)
