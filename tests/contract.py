"""The contract every PEFT method passes (DESIGN.md, testing rules).

A method is given as ``add(params, key) -> params with adapter nodes``; the checks run on a
jpeft model and one batch. Method test files call :func:`check_all` (or single checks) with
their own `add` functions.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import train

MERGE_TOLERANCE = 1e-5  # float32: W + s·A@B folded once vs the factored product
JIT_TOLERANCE = 1e-6  # float32: the same ops, fused differently by XLA
# At transformers' default init (std 0.02) a tiny random model's logits are near-uniform and
# no adapter moves its loss by more than a few percent, so the contract's models are made
# with std 0.2 (hf_models.make(..., initializer_range=INIT_STD)). There a method overfits
# one batch: Adam at OVERFIT_LEARNING_RATE takes the loss below OVERFIT_FRACTION of its start
# within OVERFIT_MAX_STEPS (LoRA on every linear needs a few steps; weaker adapters, such as
# LoRA on q and v of one layer or a per-channel scale, take more).
INIT_STD = 0.2
OVERFIT_MAX_STEPS = 48
OVERFIT_LEARNING_RATE = 3e-2
OVERFIT_FRACTION = 0.8


def batch(vocab: int, shape=(2, 12), seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, shape).astype(np.int32)
    mask = np.ones(shape, np.int32)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask > 0, ids, -100)}


def scale_field(params, key, node_type, field: str):
    """`params` with the `field` of every `node_type` node scaled by random factors in
    [0.5, 1.5] (one per element, seeded by `key` and the node's path): moves a vector off an
    initialisation where a wrong value would not show (DoRA's magnitude, IA3's vectors)."""

    def move(path, x):
        if not isinstance(x, node_type):
            return x
        node_key = jax.random.fold_in(key, zlib.crc32(path.encode()))
        value = getattr(x, field)
        factor = jax.random.uniform(node_key, value.shape, minval=0.5, maxval=1.5)
        return dataclasses.replace(x, **{field: value * factor})

    return jpeft.tree.map_nodes(move, params)


def top_level_float_arrays(jaxpr, sizes) -> list:
    """The float arrays made at the top level of `jaxpr` (outside any scan) whose size is
    one of `sizes`: e.g. a whole stack of dequantised weights that should only exist one
    layer at a time, inside the layer scan."""
    return [
        v.aval
        for eqn in jaxpr.eqns
        for v in eqn.outvars
        if jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.size in sizes
    ]


def _jitted_logits(model, params, data) -> np.ndarray:
    forward = jax.jit(lambda p, i, m: model(p, i, attention_mask=m))
    return np.asarray(forward(params, data["input_ids"], data["attention_mask"]))


def check_identity_at_init(model, params, add, data):
    adapted = add(params, jax.random.key(0))
    base = _jitted_logits(model, params, data)
    np.testing.assert_array_equal(_jitted_logits(model, adapted, data), base)


def check_jit_equals_eager(model, params, data):
    eager = model(params, data["input_ids"], attention_mask=data["attention_mask"])
    np.testing.assert_allclose(
        _jitted_logits(model, params, data), np.asarray(eager), atol=JIT_TOLERANCE
    )


def check_gradients_only_on_adapters(model, params, data, trainable_names=None):
    """Every trainable leaf's path ends in one of `trainable_names` (when given), and every
    one of them gets a non-zero gradient once the adapter is moved off its init (at an
    identity init some factors get none: LoRA's A while B is zero)."""
    trainable, frozen = jpeft.split(params)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)]
    assert paths, "nothing is trainable"
    if trainable_names is not None:
        assert all(any(p.endswith(n) for n in trainable_names) for p in paths), paths
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noise = [
        0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    moved = treedef.unflatten([x + n for x, n in zip(leaves, noise, strict=True)])

    def loss(t):
        total, count = train.causal_lm_loss(model, jpeft.combine(t, frozen), data)
        return total / count

    grads = jax.jit(jax.grad(loss))(moved)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).sum()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def run_steps(model, params, data, steps: int, learning_rate: float = 1e-2,
              stop_below: float | None = None):
    """Trains `steps` steps, or until the loss is below `stop_below` times the first step's;
    returns (params, losses, the step function)."""
    trainable, frozen = jpeft.split(params)
    frozen_before = jax.tree.map(np.array, frozen)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(trainable)
    step = train.make_train_step(model, optimizer, donate=False)
    dtypes = [x.dtype for x in jax.tree.leaves(trainable)]
    losses = []
    for i in range(steps):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, data, jax.random.key(i))
        losses.append(float(metrics["loss"]))
        if stop_below is not None and losses[-1] < stop_below * losses[0]:
            break
    assert [x.dtype for x in jax.tree.leaves(trainable)] == dtypes  # a step keeps every dtype
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(after), before)  # base bitwise unchanged
    return jpeft.combine(trainable, frozen), losses, step


def overfit(model, params, data):
    """Trains on one batch until the loss is below OVERFIT_FRACTION of its start (at most
    OVERFIT_MAX_STEPS) and asserts it got there; returns (params, losses, the step function)."""
    trained, losses, step = run_steps(
        model, params, data, OVERFIT_MAX_STEPS, OVERFIT_LEARNING_RATE, OVERFIT_FRACTION
    )
    assert losses[-1] < OVERFIT_FRACTION * losses[0], losses
    return trained, losses, step


def check_merge_equals_unmerged(model, params, merge, data):
    """Merged and unmerged give the same logits; a method whose nodes do not fold into the
    weights (:func:`jpeft.tree.folds`) is refused by `merge` with an error naming it."""
    nodes = [x for _, x in jpeft.tree.iter_nodes(params) if isinstance(x, jpeft.tree.Node)]
    unfoldable = [x for x in nodes if not jpeft.tree.folds(x)]
    if unfoldable:
        with pytest.raises(TypeError, match=f"{type(unfoldable[0]).__name__}.*not supported"):
            merge(params)
        return
    out = _jitted_logits(model, params, data)
    merged = merge(params)
    assert not any(isinstance(x, jpeft.tree.Node) for _, x in jpeft.tree.iter_nodes(merged))
    np.testing.assert_allclose(_jitted_logits(model, merged, data), out, atol=MERGE_TOLERANCE)


def check_save_load_round_trip(base, params, directory):
    """The adapter saved with Orbax and loaded onto `base` gives back every leaf bitwise."""
    jpeft.save_adapter(params, directory)
    loaded = jpeft.load_adapter(base, directory)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for (path, want), got in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(loaded), strict=True
    ):
        assert np.asarray(got).dtype == np.asarray(want).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def check_all(model, params, add, merge, data, trainable_names, directory, identity=True):
    """Every contract check (adapter checkpoints go to `directory`); returns the trained
    parameters. The model must be made with ``initializer_range=INIT_STD``.
    `trainable_names`: suffixes every trainable leaf's path must end in, or None to leave
    that to the node classes' ``trainable_fields``. `identity`: False for a method whose
    adapted model does not start equal to the base (prompt and prefix tuning add virtual
    tokens that every token sees from the start), which skips that one check."""
    if identity:
        check_identity_at_init(model, params, add, data)
    adapted = add(params, jax.random.key(0))
    check_jit_equals_eager(model, adapted, data)
    check_gradients_only_on_adapters(model, adapted, data, trainable_names)
    trained, _, step = overfit(model, adapted, data)
    assert step._cache_size() == 1  # the second step compiled nothing
    check_save_load_round_trip(params, trained, directory)
    check_merge_equals_unmerged(model, trained, merge, data)
    return trained
