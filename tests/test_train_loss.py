"""The chunked causal-LM loss: value and gradients equal the plain full-logits formulation,
for the fused head (a plain head weight, tied or not) and for a head that is a parameter node."""

from __future__ import annotations

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import train

# float32 throughout: the fused and the plain loss differ only in summation order.
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


def _plain_loss(model, params, batch):
    """Σ NLL over labelled next tokens from whole ``[b, t, v]`` logits, as written."""
    logits = model(params, batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = jnp.where(batch["attention_mask"] > 0, batch["input_ids"], train.IGNORE_INDEX)
    logits, labels = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = labels != train.IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0))


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hf_models.COMMON["vocab_size"], (3, 19))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding: ignored labels
    return {"input_ids": jnp.asarray(ids, jnp.int32), "attention_mask": jnp.asarray(mask)}


def _assert_trees_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize(
    "kind, chunk_tokens",
    # 3 rows of 18 labelled positions: chunks of 4 positions (12 tokens) with a remainder
    # for every kind, one chunk holding them all (32 positions) for the tied head with
    # biases, and chunk_tokens under the batch size (1 position per chunk).
    [("llama", 12), ("llama-tied-bias", 12), ("gpt2", 12), ("llama-tied-bias", 96),
     ("llama", 2)],
)  # fmt: skip
def test_loss_and_gradients_equal_the_plain_formulation(tmp_path, kind, chunk_tokens):
    hf_models.make(kind, tmp_path)
    model, params = jpeft.models.from_pretrained(tmp_path)
    batch = _batch()

    def chunked(p):
        return train.causal_lm_loss(model, p, batch, chunk_tokens=chunk_tokens)[0]

    np.testing.assert_allclose(chunked(params), _plain_loss(model, params, batch), LOSS_RTOL)
    # Every weight differentiated, the head's included (the fused backward's recompute).
    _assert_trees_close(
        jax.jit(jax.grad(chunked))(params),
        jax.jit(jax.grad(lambda p: _plain_loss(model, p, batch)))(params),
    )
    # LoRA factors only, the head frozen (the common case: XLA drops the head's gradient).
    adapted = jpeft.lora.apply(
        params, rank=4, targets="all-linear", init_lora_weights=False, key=jax.random.key(1)
    )
    trainable, frozen = jpeft.split(adapted)

    def plain(t):
        return _plain_loss(model, jpeft.combine(t, frozen), batch)

    _assert_trees_close(
        jax.jit(jax.grad(lambda t: chunked(jpeft.combine(t, frozen))))(trainable),
        jax.jit(jax.grad(plain))(trainable),
    )


def test_a_trained_head_node_gets_its_gradient(tmp_path):
    """A head that is a parameter node (here a trainable copy, modules_to_save) takes the
    unfused path and is differentiated as written."""
    hf_models.make("llama", tmp_path)
    model, params = jpeft.models.from_pretrained(tmp_path)
    adapted = jpeft.lora.apply(
        params,
        rank=4,
        targets=["q_proj"],
        modules_to_save=["lm_head"],
        init_lora_weights=False,
        key=jax.random.key(1),
    )
    trainable, frozen = jpeft.split(adapted)
    batch = _batch()
    got = jax.grad(
        lambda t: train.causal_lm_loss(model, jpeft.combine(t, frozen), batch, chunk_tokens=24)[0]
    )(trainable)
    want = jax.grad(lambda t: _plain_loss(model, jpeft.combine(t, frozen), batch))(trainable)
    _assert_trees_close(got, want)
    head = got["lm_head"]["weight"]
    assert float(jnp.abs(jax.tree.leaves(head)[0]).max()) > 0


def test_every_step_factory_takes_the_same_options_and_names_a_wrong_one():
    import optax

    from jpeft import parallel

    optimizer = optax.sgd(1.0)
    factories = (train.make_train_step, parallel.make_pmap_train_step)
    for make in factories:
        with pytest.raises(TypeError, match="grad_acum"):
            make(None, optimizer, grad_acum=2)
        with pytest.raises(ValueError, match="grad_accum must be an integer of at least 1, got 0"):
            make(None, optimizer, grad_accum=0)
    mesh = parallel.make_mesh()
    with pytest.raises(TypeError, match="max_grad"):
        parallel.make_sharded_train_step(None, optimizer, mesh, max_grad=1.0)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3, 1e3])
def test_clipping_scales_the_update_to_the_clipped_norm(max_grad_norm):
    """With SGD at learning rate 1 the update is minus the (clipped) gradient: its global
    norm is `max_grad_norm` when the gradient is longer, the gradient's norm otherwise."""
    import optax
    from multihost_worker import setup

    model, params, _, batch = setup()
    trainable, frozen = jpeft.split(params)
    step = train.make_train_step(model, optax.sgd(1.0), max_grad_norm=max_grad_norm, donate=False)
    new, _, metrics = step(trainable, frozen, optax.sgd(1.0).init(trainable), batch, None)
    update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b), new, trainable)
    norm = float(np.sqrt(sum(np.sum(u**2) for u in jax.tree.leaves(update))))
    grad_norm = float(metrics["grad_norm"])  # before clipping
    assert grad_norm > 1e-3 and grad_norm < 1e3  # so that the two bounds clip and do not
    expected = grad_norm if max_grad_norm is None else min(grad_norm, max_grad_norm)
    np.testing.assert_allclose(norm, expected, rtol=1e-4)
