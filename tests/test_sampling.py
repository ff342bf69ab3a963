"""Sampling in ``jpeft.generate``: a seed fixes the output, temperature-1 draws follow the
model's softmax, top-p keeps only the nucleus, and a vanishing top-p is greedy decoding."""

from __future__ import annotations

import numpy as np
import pytest
from multihost_worker import base

from jpeft.generation import generate_tokens

DRAWS = 2048
TV_TOLERANCE = 0.15  # total variation between 2048 draws and the softmax they come from


@pytest.fixture(scope="module")
def tiny():
    model, params = base()
    norm = params["model"]["norm"]
    norm["weight"] = norm["weight"] * 6  # sharper logits than the random init gives
    prompt = np.array([[5, 17, 3, 60, 22]], np.int32)
    return model, params, prompt


def _tokens(tiny, rows=1, **options):
    model, params, prompt = tiny
    ids = np.repeat(prompt, rows, axis=0)
    out = generate_tokens(model, params, ids, np.ones_like(ids), **options)
    return np.asarray(out)


def _first_token_probs(tiny, temperature=1.0):
    model, params, prompt = tiny
    logits = np.asarray(model(params, prompt)[0, -1], np.float64) / temperature
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


def test_a_seed_fixes_the_sample_and_another_seed_changes_it(tiny):
    first = _tokens(tiny, max_new_tokens=12, temperature=1.0, seed=3)
    np.testing.assert_array_equal(_tokens(tiny, max_new_tokens=12, temperature=1.0, seed=3), first)
    assert not np.array_equal(_tokens(tiny, max_new_tokens=12, temperature=1.0, seed=4), first)


def test_draws_follow_the_softmax_of_the_logits(tiny):
    for temperature, other in ((1.0, 0.5), (0.5, 1.0)):
        draws = _tokens(tiny, rows=DRAWS, max_new_tokens=1, temperature=temperature)[:, 0]
        frequency = np.bincount(draws, minlength=97) / DRAWS
        distance = 0.5 * np.abs(frequency - _first_token_probs(tiny, temperature)).sum()
        # Sampling noise alone gives about 0.05-0.07 here; the wrong temperature about 0.35.
        assert distance < TV_TOLERANCE, (temperature, distance)
        wrong = 0.5 * np.abs(frequency - _first_token_probs(tiny, other)).sum()
        assert wrong > 2 * distance, (temperature, wrong, distance)


def test_top_p_samples_only_the_nucleus(tiny):
    probs = _first_token_probs(tiny)
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[before < 0.3].tolist())  # the fewest tokens holding 30% of the mass
    draws = _tokens(tiny, rows=DRAWS, max_new_tokens=1, temperature=1.0, top_p=0.3)[:, 0]
    assert set(draws.tolist()) == nucleus  # every nucleus token drawn, and nothing else


def test_a_vanishing_top_p_is_greedy(tiny):
    greedy = _tokens(tiny, max_new_tokens=12)
    np.testing.assert_array_equal(
        _tokens(tiny, max_new_tokens=12, temperature=1.0, top_p=1e-9, seed=5), greedy
    )
    assert greedy[0, 0] == int(np.argmax(_first_token_probs(tiny)))


def test_the_function_and_its_module_have_different_names():
    import inspect

    import jpeft

    assert inspect.ismodule(jpeft.generation) and inspect.ismodule(jpeft.wrapping)
    assert jpeft.generate is jpeft.generation.generate and jpeft.wrap is jpeft.wrapping.wrap
