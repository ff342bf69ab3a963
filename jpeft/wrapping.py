"""Adapters on models jpeft does not own: Flax linen, Flax NNX, Equinox, hand-written.

:func:`wrap` turns any ``apply_fn(params, *args)`` into one that accepts a tree with adapter
nodes. It folds each node into the dense weight it stands for *inside* the caller's jit
(``W + s·A@B``), so gradients reach the adapter factors and the user's model code is
untouched. This costs one weight-sized product per adapted matrix per call; jpeft's own models
avoid it by computing the factored product ``x@W + s·(x@A)@B`` in their layers.
Input dropout on the adapter path is not applied on this path.

Flax kernels are ``[in, out]``, jpeft's layout, and are found under the name ``kernel``.

Example (linen)::

    params = jpeft.lora.apply(variables["params"], targets=["query", "value"], key=key)
    forward = jpeft.wrap(lambda p, x: model.apply({"params": p}, x))
    trainable, frozen = jpeft.split(params)
    grads = jax.grad(lambda t: loss(forward(jpeft.combine(t, frozen), x)))(trainable)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jpeft import tree


def wrap(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``apply_fn`` made to accept a parameter tree holding adapter nodes.

    Args:
      apply_fn: ``apply_fn(params, *args, **kwargs)`` over a plain tree of arrays.

    Returns:
      ``wrapped(params, *args, **kwargs)``, equal to ``apply_fn`` on the merged tree and
      differentiable with respect to the adapter leaves.
    """

    @functools.wraps(apply_fn)
    def wrapped(params: Any, *args: Any, **kwargs: Any) -> Any:
        return apply_fn(tree.materialize(params), *args, **kwargs)

    return wrapped
