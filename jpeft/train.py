"""The causal-LM loss and a jitted training step that differentiates the adapters only.

The step takes the tree already cut in two by :func:`jpeft.split`: gradients, optimizer
state and updates exist for the trainable half alone, and the frozen half (which may be
bfloat16 or NF4) is an argument that is never differentiated or copied.

The loss never materialises ``[tokens, vocab]`` float32 logits at once: the final hidden
states are cut into chunks along the sequence, and each chunk's logits are computed and
reduced to a log-likelihood. With a plain head weight (the usual frozen or tied head) the
hidden states' gradient is computed in the same forward pass (fused linear cross-entropy),
so the backward pass forms no logits; a head that is a parameter node (LoRA, NF4, a
trainable copy) is recomputed in the backward pass instead (:func:`jax.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft import adapter_bank, matmul, nn, tree

if TYPE_CHECKING:
    from jpeft.models.decoder import DecoderLM

IGNORE_INDEX = -100
"""Label value excluded from the loss (Hugging Face's convention)."""


def causal_lm_loss(
    model: DecoderLM,
    params: dict,
    batch: dict[str, jax.Array],
    *,
    chunk_tokens: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of tokens it covers.

    ``loss = -Σ log p(labels[:, i+1] | tokens[:, :i+1])`` over positions whose label is not
    :data:`IGNORE_INDEX`, as transformers shifts labels for causal LMs.

    Args:
      model, params: the model and its (combined) parameter tree.
      batch: ``input_ids [b, t]``, optional ``attention_mask [b, t]`` (0 on padding),
        optional ``labels [b, t]`` (defaults to `input_ids` with padding ignored) and
        optional ``segment_ids [b, t]`` for packed examples (see :mod:`jpeft.data`) and
        optional ``adapter_ids [b]``, each row's adapter of those stacked in `params`
        (:mod:`jpeft.adapters`; each adapter's gradient then comes from its own rows only).
      chunk_tokens: tokens per logits chunk, over the whole batch: each chunk holds
        ``max(1, chunk_tokens // b)`` sequence positions of every row, which bounds its
        ``[b, positions, v]`` float32 logits and keeps the head's matmul as tall whatever
        the batch's shape. 128 holds SmolLM2's chunk logits to 24 MiB; at 4 x 256 tokens,
        4 x 128 held 144 MiB more XLA temporaries at the same speed, and at 1 x 2048 chunks
        of 32 made the head's matmuls so short that the step was 5-9% slower
        (bench/README.md).

    Returns:
      ``(loss_sum, token_count)``, both float32 scalars.
    """
    if batch.get("adapter_ids") is not None:  # one of several stacked adapters per row
        params = adapter_bank.route(params, batch["adapter_ids"])
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids if mask is None else jnp.where(mask > 0, input_ids, IGNORE_INDEX)
    hidden, _ = model.hidden_states(
        params, input_ids, attention_mask=mask, segment_ids=batch.get("segment_ids")
    )
    hidden, targets = hidden[:, :-1], labels[:, 1:]
    steps = hidden.shape[1]
    chunk = max(1, min(chunk_tokens // hidden.shape[0], steps))
    pad = -steps % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    batch_size, dim = hidden.shape[0], hidden.shape[-1]
    hidden = hidden.reshape(batch_size, -1, chunk, dim).swapaxes(0, 1)
    targets = targets.reshape(batch_size, -1, chunk).swapaxes(0, 1)

    head = model.head_weight(params)
    if isinstance(head, jax.Array):  # a plain weight: fused forward and gradient

        def chunk_loss(h, y):
            return _fused_head_nll(h, head, y, model.tied)

    else:  # a parameter node (LoRA, NF4, trainable copy): differentiated as written

        @jax.checkpoint
        def chunk_loss(h, y):
            return _head_nll(model.logits(params, h), y)[:2]

    def body(carry, xs):
        loss, count = chunk_loss(*xs)
        return (carry[0] + loss, carry[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (loss, count), _ = jax.lax.scan(body, (zero, zero), (hidden, targets))
    return loss, count


def _head_nll(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed NLL of labels `y` under `logits` ``[b, c, v]``, the count of labelled
    positions, and the NLL's gradient with respect to the logits (``softmax - onehot`` on
    labelled positions), all float32."""
    logits = logits.astype(jnp.float32)
    valid = y != IGNORE_INDEX
    target = jnp.where(valid, y, 0)[..., None]
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    nll = lse[..., 0] - jnp.take_along_axis(logits, target, axis=-1)[..., 0]
    onehot = jnp.arange(logits.shape[-1]) == target
    grad = jnp.where(valid[..., None], jnp.exp(logits - lse) - onehot, 0.0)
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid, dtype=jnp.float32), grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_head_nll(
    h: jax.Array, w: jax.Array, y: jax.Array, tied: bool
) -> tuple[jax.Array, jax.Array]:
    """``(Σ NLL, count)`` of a chunk through a plain output head `w` (``[v, d]`` when
    `tied`, else ``[d, v]``), with the hidden states' gradient computed in the forward pass
    (fused linear cross-entropy): the backward pass then needs no second ``[b, c, v]``
    logits product, which saves ``2·v·d`` FLOPs per token. The head's own gradient is
    recomputed in the backward pass, and XLA drops that work when the head is frozen."""
    return _fused_head_nll_fwd(h, w, y, tied)[0]


def _fused_head_nll_fwd(h, w, y, tied):
    loss, count, grad = _head_nll(nn.output_head(h, w, tied), y)
    grad = grad.astype(h.dtype)
    if tied:  # head: [v, d]
        dh = matmul.matmul(grad, w)
    elif matmul.narrow(matmul.product_dtype(h.dtype, w.dtype)):
        dh = matmul.matmul_transposed(grad, w)
    else:  # head: [d, v]. As (head @ gradᵀ)ᵀ: XLA:CPU ran grad @ headᵀ at half the speed
        # (a 32000-token head, 2-core AMD EPYC Zen 4)
        head = w.astype(h.dtype)
        dh = jnp.swapaxes(head @ jnp.swapaxes(grad, -1, -2), -1, -2)
    return (loss, count), (dh, h, w, y)


def _fused_head_nll_bwd(tied, residuals, cotangents):
    dh, h, w, y = residuals
    scale = cotangents[0]
    _, _, grad = _head_nll(nn.output_head(h, w, tied), y)
    rows, grad = h.reshape(-1, h.shape[-1]), grad.reshape(-1, grad.shape[-1]).astype(h.dtype)
    dw = grad.T @ rows if tied else rows.T @ grad
    zero_y = np.zeros(y.shape, jax.dtypes.float0)
    return (dh * scale).astype(h.dtype), (dw * scale).astype(w.dtype), zero_y


_fused_head_nll.defvjp(_fused_head_nll_fwd, _fused_head_nll_bwd)


_MODEL_REMAT = object()  # StepOptions.remat unset: keep the model's own policy


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepOptions:
    """What every form of the train step takes (:func:`make_train_step`,
    :func:`jpeft.parallel.make_sharded_train_step`, :func:`jpeft.parallel.make_pmap_train_step`
    accept these fields as keyword arguments).

    Attributes:
      grad_accum: micro-batches per step; batch arrays are then ``[grad_accum, b, t]`` and
        the loss is normalised by the tokens of all micro-batches together.
      max_grad_norm: clip the global gradient norm to this (None: no clipping).
      remat: override the model's layer remat policy (see
        :data:`jpeft.models.decoder.SAVED_ACTIVATIONS`; None: off; unset: the model's).
      loss: ``loss(model, params, batch) -> (loss_sum, token_count)``.
    """

    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    remat: str | None | object = _MODEL_REMAT
    loss: Callable[..., tuple[jax.Array, jax.Array]] = causal_lm_loss

    def __post_init__(self):
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be an integer of at least 1, got {self.grad_accum}")


def train_step_fn(
    model: DecoderLM,
    optimizer: optax.GradientTransformation,
    options: StepOptions | None = None,
    *,
    axis_name: str | None = None,
) -> Callable:
    """The un-jitted step of :func:`make_train_step`, for wrapping in :func:`jax.jit` with
    shardings or in :func:`jax.pmap` (see :mod:`jpeft.parallel`).

    Args:
      model, optimizer: as in :func:`make_train_step`.
      options: the step's :class:`StepOptions` (None: the defaults).
      axis_name: a mapped axis (of :func:`jax.pmap` or :func:`jax.shard_map`) over which
        the loss sums, token counts and gradients are summed (:func:`jax.lax.psum`) before
        the division by the token count, so that each device computes the update of the
        whole global batch. None: no collective.

    Returns:
      ``step(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state, metrics)``.
    """
    options = options or StepOptions()
    grad_accum, max_grad_norm, loss = options.grad_accum, options.max_grad_norm, options.loss
    if options.remat is not _MODEL_REMAT:
        model = dataclasses.replace(model, remat=options.remat)

    def summed_loss(trainable, frozen, batch, key):
        params = tree.with_rng(tree.combine(trainable, frozen), key)
        return loss(model, params, batch)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def step(trainable, frozen, opt_state, batch, key):
        if grad_accum == 1:
            (loss_sum, tokens), grads = grad_fn(trainable, frozen, batch, key)
        else:
            keys = jax.random.split(key, grad_accum)

            def micro(carry, xs):
                micro_batch, micro_key = xs
                (loss_sum, tokens), grads = grad_fn(trainable, frozen, micro_batch, micro_key)
                acc_loss, acc_tokens, acc_grads = carry
                acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
                return (acc_loss + loss_sum, acc_tokens + tokens, acc_grads), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            zero = jnp.zeros((), jnp.float32)
            (loss_sum, tokens, grads), _ = jax.lax.scan(micro, (zero, zero, zeros), (batch, keys))
        if axis_name is not None:
            loss_sum, tokens, grads = jax.lax.psum((loss_sum, tokens, grads), axis_name)
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        if max_grad_norm is not None:
            factor = jnp.minimum(1.0, max_grad_norm / (grad_norm + 1e-6))
            grads = jax.tree.map(lambda g: g * factor, grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "tokens": tokens}
        return trainable, opt_state, metrics

    return step


def make_train_step(
    model: DecoderLM,
    optimizer: optax.GradientTransformation,
    *,
    donate: bool = True,
    donate_trainable: bool = False,
    **options: Any,
) -> Callable:
    """A jitted step ``(trainable, frozen, opt_state, batch, key) -> (trainable, opt_state,
    metrics)``.

    Args:
      model: the model.
      optimizer: an optax transformation over the trainable half (``optimizer.init(trainable)``).
      donate: donate the optimizer state's buffers to the step (the one passed in is then
        unusable: carry on with the one returned). The trainable half is never donated:
        :func:`jpeft.split` shares its buffers with the tree it was cut from, which would
        be deleted with it, and an adapter is small.
      donate_trainable: donate the trainable half too, for a caller whose trainable buffers
        nothing else holds (e.g. a copy, ``jax.tree.map(jnp.copy, trainable)``, carried
        from step to step, as :func:`jpeft.trainer.fit` does): XLA then updates it in place
        (on SmolLM2 with r=16 on every linear, 70 MB less peak memory on CPU).
      **options: the fields of :class:`StepOptions` (``grad_accum``, ``max_grad_norm``,
        ``remat``, ``loss``).

    Returns:
      The step. ``metrics`` holds ``loss`` (mean per token), ``grad_norm`` (before
      clipping) and ``tokens``.

    Example::

      trainable, frozen = jpeft.split(params)
      optimizer = optax.adamw(1e-4)
      step = jpeft.train.make_train_step(model, optimizer)
      trainable, opt_state, metrics = step(trainable, frozen, optimizer.init(trainable), batch, key)
    """
    step = train_step_fn(model, optimizer, StepOptions(**options))
    donated = ((0,) if donate_trainable else ()) + ((2,) if donate else ())
    return jax.jit(step, donate_argnums=donated)
