"""8-bit AdamW against bitsandbytes' ``AdamW8bit`` running on CPU: maps, quantiser, 50 steps
of parameters and quantised state, the state's size, and a train-state round trip."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jpeft import optim8bit, train_state, trainer

LUT_SIZE = 65536


def lut_quantize(x, code, block_size):
    """bitsandbytes 0.50's CPU quantiser (``quantize_cpu_impl``), for the parity test: the
    value times 1/absmax picks one of 65536 even bins of [-1, 1], each mapped to the code
    nearest its centre; an all-zero block gets code 0."""
    f32 = np.float32
    midpoints = f32(0.5) * (code[:-1] + code[1:])
    centres = f32(-1) + (f32(2) * np.arange(LUT_SIZE, dtype=f32)) / f32(LUT_SIZE - 1)
    lut = jnp.asarray(np.searchsorted(midpoints, centres, side="left").astype(np.uint8))
    blocks = optim8bit._blocks(x, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normed = jnp.clip(blocks * (1 / jnp.where(absmax == 0, 1, absmax))[:, None], -1, 1)
    bins = (((normed + 1) * 0.5) * (LUT_SIZE - 1) + 0.5).astype(jnp.int32)
    codes = jnp.where(absmax[:, None] == 0, 0, lut[bins]).astype(jnp.uint8)
    return optim8bit.Quantized8bit(codes.reshape(-1)[: x.size].reshape(x.shape), absmax)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_are_bitsandbytes_maps_to_the_bit(signed):
    ours = optim8bit.dynamic_map(signed)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, F.create_dynamic_map(signed=signed).numpy())


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_picks_the_nearest_code_of_each_block(signed):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1000) * np.exp(rng.uniform(-9, 2, 1000))).astype(np.float32)
    x = x if signed else np.abs(x)
    x[256:512] = 0  # an all-zero block
    code = optim8bit.dynamic_map(signed)
    q = optim8bit.quantize(jnp.asarray(x), code, 256)
    blocks = np.pad(x, (0, 24)).reshape(4, 256)
    absmax = np.abs(blocks).max(axis=1)
    np.testing.assert_array_equal(q.absmax, absmax)
    normed = (blocks / np.where(absmax == 0, 1, absmax)[:, None]).reshape(-1)[:1000]
    distance = np.abs(code[None, :] - normed[:, None])
    ours = np.asarray(q.codes, np.int64)
    np.testing.assert_array_equal(distance[np.arange(1000), ours], distance.min(axis=1))
    back = optim8bit.dequantize(q, code, 256)
    np.testing.assert_array_equal(back[256:512], 0)
    np.testing.assert_allclose(back, x, atol=absmax.max() * 0.011, rtol=0.07)

    # bitsandbytes' CPU quantiser bins the normalised value (2/65535 wide) before looking
    # the code up: its code is never more than a bin's width farther than the nearest.
    theirs, theirs_absmax = torch.ops.bitsandbytes.quantize_blockwise(
        torch.from_numpy(x), F.create_dynamic_map(signed=signed), 256
    )
    np.testing.assert_array_equal(theirs_absmax.numpy(), absmax)
    # (Its all-zero block gets code 0, ours the code of 0: both dequantise to 0.)
    farther = distance[np.arange(1000), theirs.numpy()] - distance.min(axis=1)
    farther[256:512] = 0
    assert farther.max() <= 2 / (LUT_SIZE - 1) and (theirs.numpy() != ours).any()


def _parity_run(lr=1e-3, weight_decay=1e-2, steps=50):
    """bitsandbytes' AdamW8bit and adamw_8bit over the same gradients: a 64x128 leaf (8 bits)
    and a 10x30 one (below min_8bit_size: float32). Yields per step both parameter sets and
    both states of the large leaf."""
    rng = np.random.default_rng(0)
    shapes = {"large": (64, 128), "small": (10, 30)}
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    theirs = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in start.items()}
    optimizer = bnb.optim.AdamW8bit(list(theirs.values()), lr=lr, weight_decay=weight_decay)
    tx = optim8bit.adamw_8bit(lr, weight_decay=weight_decay)
    params = {k: jnp.asarray(v) for k, v in start.items()}
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        grads = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}
        for k, p in theirs.items():
            p.grad = torch.from_numpy(grads[k])
        optimizer.step()
        params, state = step(params, state, grads)
        ours_np = {k: np.asarray(v) for k, v in params.items()}
        yield (
            ours_np,
            {k: p.detach().numpy() for k, p in theirs.items()},
            state,
            optimizer.state[theirs["large"]],
        )


def test_with_bitsandbytes_cpu_quantiser_50_steps_match_bitsandbytes(monkeypatch):
    """With bitsandbytes' CPU quantiser swapped in, everything else (update order, bias
    correction, weight decay, block absmax, float32 state of small leaves) is bitsandbytes':
    the codes are equal at every step (but for a rare neighbour), the absmax and parameters
    equal to float rounding."""
    monkeypatch.setattr(optim8bit, "quantize", lut_quantize)
    for ours, theirs, state, their_state in _parity_run():
        for name in ours:
            np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=2e-5)
        for ours_codes, key in (
            (state.mu["large"].codes, "state1"),
            (state.nu["large"].codes, "state2"),
        ):
            # A value on a bin's edge may round either way after float rounding upstream.
            step = np.asarray(ours_codes, np.int64) - their_state[key].numpy()
            assert np.abs(step).max() <= 1 and np.mean(step == 0) >= 0.999
        for ours_absmax, key in (
            (state.mu["large"].absmax, "absmax1"),
            (state.nu["large"].absmax, "absmax2"),
        ):
            np.testing.assert_allclose(ours_absmax, their_state[key].numpy(), rtol=1e-6)
        assert isinstance(state.mu["small"], jax.Array) and state.mu["small"].dtype == jnp.float32


def test_nearest_code_rounding_stays_within_a_step_of_bitsandbytes_cpu_over_50_steps():
    """Rounding to the nearest code (as bitsandbytes' GPU kernel and its earlier CPU kernel
    do) differs from the CPU's binned lookup for values below ~3e-5 of a block's absmax: over
    50 steps of lr 1e-3 the parameters stay within half a learning rate of bitsandbytes'."""
    for ours, theirs, _, _ in _parity_run():
        np.testing.assert_allclose(ours["small"], theirs["small"], rtol=0, atol=2e-5)
        np.testing.assert_allclose(ours["large"], theirs["large"], rtol=0, atol=5e-4)


def test_state_of_a_large_leaf_is_two_bytes_per_parameter_and_a_scale_per_block():
    tx = optim8bit.adamw_8bit(1e-3, min_8bit_size=4096)
    trainable = {"w": jnp.zeros((100, 50)), "frozen": None, "bias": jnp.zeros(50)}
    state = tx.init(trainable)
    for moment in (state.mu, state.nu):
        assert moment["frozen"] is None
        assert moment["bias"].dtype == jnp.float32 and moment["bias"].shape == (50,)
        assert moment["w"].codes.dtype == jnp.uint8 and moment["w"].codes.shape == (100, 50)
        assert moment["w"].absmax.dtype == jnp.float32 and moment["w"].absmax.shape == (20,)
    large = sum(x.nbytes for x in jax.tree.leaves((state.mu["w"], state.nu["w"])))
    assert large == 2 * 5000 + 2 * 4 * 20
    float_state = optax.adamw(1e-3).init(trainable)
    assert sum(x.nbytes for x in jax.tree.leaves(float_state)) > 3.5 * large


def test_trainable_half_with_none_leaves_updates_and_round_trips_a_train_state(tmp_path):
    tx = optim8bit.adamw_8bit(optax.linear_schedule(1e-2, 0.0, 10))
    trainable = {"w": jnp.ones((64, 80)), "frozen": None, "b": jnp.ones(8)}
    state = tx.init(trainable)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), trainable)
    updates, state = jax.jit(tx.update)(grads, state, trainable)
    assert updates["frozen"] is None
    # Adam's first step moves each parameter by the learning rate, plus the decay.
    np.testing.assert_allclose(updates["w"], -1e-2 * (1 + 1e-2), rtol=1e-5)
    np.testing.assert_allclose(updates["b"], -1e-2 * (1 + 1e-2), rtol=1e-5)
    train_state.save_train_state(
        tmp_path, 1, params=trainable, opt_state=state, data_position=3, rng=jax.random.key(0)
    )
    restored = train_state.restore_train_state(
        tmp_path, params=trainable, opt_state_like=tx.init(trainable)
    )
    for a, b in zip(jax.tree.leaves(restored.opt_state), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert isinstance(restored.opt_state.mu["w"], optim8bit.Quantized8bit)


def test_bad_hyperparameters_and_missing_params_are_named():
    with pytest.raises(ValueError, match="b1 and b2 must be in"):
        optim8bit.adamw_8bit(1e-3, b2=1.0)
    with pytest.raises(ValueError, match="block_size must be at least 1"):
        optim8bit.adamw_8bit(1e-3, block_size=0)
    tx = optim8bit.adamw_8bit(1e-3)
    x = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(x, tx.init(x))


def test_train_config_builds_the_8bit_optimizer_with_its_schedule_and_decay():
    trainable = {"w": jnp.ones((64, 64))}
    config = trainer.TrainConfig(optim="adamw_8bit", learning_rate=1e-2, warmup_steps=0)
    tx = config.optimizer(total_steps=10)
    state = tx.init(trainable)
    assert isinstance(state.mu["w"], optim8bit.Quantized8bit)
    updates, _ = tx.update(trainable, state, trainable)
    np.testing.assert_allclose(updates["w"], -1e-2, rtol=1e-5)  # cosine at step 0: the peak
    with pytest.raises(ValueError, match="optim must be one of"):
        trainer.TrainConfig(optim="sgd")
