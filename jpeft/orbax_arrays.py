"""Arrays stored with Orbax as a nested dict of string keys: what adapter checkpoints
(:mod:`jpeft.checkpoint`) and train states (:mod:`jpeft.train_state`) share.

Both write their arrays as one nested dict (:func:`nest` builds it from flat key tuples) and,
before restoring, compare Orbax's metadata of the stored arrays with the shapes and dtypes
the reader expects (:func:`check_stored`), so that a checkpoint that does not fit fails with
the name of the array rather than inside Orbax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jpeft import tree
from jpeft.hf.checkpoints import CheckpointError


def orbax_checkpoint() -> Any:
    """``orbax.checkpoint``, imported on first use: it adds about 30 MB to the resident memory
    of every process, and only checkpointing needs it."""
    import orbax.checkpoint

    return orbax.checkpoint


def nest(flat: dict[tuple, Any]) -> dict:
    """``{("a", "b"): x}`` -> ``{"a": {"b": x}}``."""
    nested: dict = {}
    for keys, value in flat.items():
        tree.set_path(nested, keys, value)
    return nested


def dotted(keys: Any) -> str:
    """``"a.b.0"`` for the keys ``("a", "b", 0)``."""
    return ".".join(map(str, keys))


def check_stored(stored: Any, expected: dict, stored_in: str, described_by: str) -> None:
    """Raises a CheckpointError naming the first array whose presence, shape or dtype in
    Orbax metadata `stored` differs from `expected` (string-key tuples to ``(shape, dtype)``).

    Args:
      stored: the tree of array metadata Orbax reads from a checkpoint.
      expected: what the reader expects, e.g. ``{("params", "w"): ((2, 3), float32)}``.
      stored_in: the checkpoint folder, for the messages.
      described_by: what `expected` comes from, for the messages.
    """
    found = {
        tuple(map(str, tree.path_keys(path))): (tuple(m.shape), jnp.dtype(m.dtype))
        for path, m in jax.tree_util.tree_flatten_with_path(stored)[0]
    }
    for keys, (shape, dtype) in expected.items():
        if keys not in found:
            raise CheckpointError(
                f"{stored_in} has no array {dotted(keys)}, which {described_by} expects"
            )
        if found[keys] != (shape, dtype):
            got_shape, got_dtype = found[keys]
            raise CheckpointError(
                f"{stored_in}: array {dotted(keys)} is stored with shape {got_shape} and dtype "
                f"{got_dtype.name}, but {described_by} expects shape {shape} and dtype "
                f"{dtype.name}"
            )
    extra = sorted(dotted(keys) for keys in found.keys() - expected.keys())
    if extra:
        raise CheckpointError(
            f"{stored_in} holds arrays that {described_by} does not expect: {extra[:5]}"
        )
