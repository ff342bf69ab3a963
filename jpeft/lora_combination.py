"""Weighted combinations of LoRA adapters into a new one, as Hugging Face PEFT's
``LoraModel.add_weighted_adapter``.

Each input is a parameter tree over one base holding :class:`jpeft.lora.LoraWeight` nodes;
adapter ``i`` has weight ``w_i``, and on a module it adapts ``ΔW_i = s_i · A_i @ B_i``
(``A: [in, r]``, ``B: [r, out]``). The combination adapts every (module, layer) that at
least one input adapts, with scale 1 (PEFT's new adapter has ``lora_alpha = r``):

- ``cat``: the factors side by side, ``A = [w_1 s_1 A_1 | w_2 s_2 A_2 | ...]``,
  ``B = [B_1; B_2; ...]``, so ``ΔW = Σ w_i ΔW_i`` exactly; the rank is the sum of the
  adapters' ranks.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the merge
  rule below applied to the ``A`` factors and, separately, to the ``B`` factors, with
  weights ``±√|w_i s_i|`` on ``A`` (the sign of ``w_i s_i``) and ``√|w_i s_i|`` on ``B``.
  The adapters must have one rank. Except for ``linear`` with one adapter this is not
  ``Σ w_i ΔW_i`` (PEFT calls it a rough approximation).
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``:
  the merge rule applied to the deltas ``ΔW_i`` with weights ``w_i``, then the best
  rank-``k`` factorisation of the result by SVD (``k = svd_rank``, by default the largest
  of the adapters' ranks): with ``ΔWᵀ = U S Vᵀ`` (PEFT's ``[out, in]`` orientation),
  ``B = (U_k S_k)ᵀ`` and ``A = V_k``, each clamped to ``±q`` where ``q`` is the `svd_clamp`
  quantile of their entries when it is given.

The merge rules over tensors ``T_i`` (one layer of one module) with weights ``λ_i``:

- task arithmetic (``linear``, ``svd``): ``Σ λ_i T_i``;
- ``magnitude_prune``: each ``T_i`` keeps its ``⌊density · size⌋`` entries largest in
  magnitude (the rest become 0), then ``Σ λ_i T_i``;
- ``dare_linear``: each entry of each ``T_i`` kept with probability `density` and divided
  by it (Yu et al., 2023), then ``Σ λ_i T_i``;
- ``ties`` (Yadav et al., 2023; ``dare_ties`` with DARE's pruning): magnitude pruning, then
  per entry the elected sign ``σ = sign(Σ T_i)`` (``"total"``) or ``sign(Σ sign T_i)``
  (``"frequency"``), 0 counting as positive, and the mean of ``λ_i T_i`` over the ``i``
  whose ``T_i`` has sign ``σ`` (0 where none has).

A `density` of 1 prunes nothing (DARE then is deterministic). Adapters that do not adapt a
layer take no part in that layer's merge, as in PEFT. All arithmetic is float32.

Differences from PEFT, each where PEFT fails or is wrong without a word:

- the layers adapted are the union of the inputs' (PEFT takes the first adapter's
  ``layers_to_transform``, dropping layers only the others adapt, and fails on a layer of
  its targets that no adapter adapts);
- the new adapter's scale is 1 even when the first adapter uses rsLoRA (PEFT copies its
  ``use_rslora`` with ``lora_alpha = r``, and so scales the result by ``√r``);
- an `svd_rank` above ``min(in, out)`` pads the factors with zeros (PEFT's full SVD then
  gives ``A`` and ``B`` of two ranks, which do not multiply);
- mismatched weights, a missing `density`, DARE's ``density = 0`` (PEFT divides 0 by 0)
  and options the type does not use are errors.

Example::

    combined = jpeft.lora_combination.combine(
        [params_a, params_b], [0.7, 0.3], combination_type="ties", density=0.5)
    jpeft.hf.export_peft(combined, "out/combined")
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import lora, nn, tree

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATION_TYPES = ("cat", *FACTOR_TYPES, *SVD_TYPES)
SIGN_METHODS = ("total", "frequency")

# combination type (without "_svd") -> (pruning, merge); "svd" alone is task arithmetic.
_RULES = {
    "linear": (None, "sum"),
    "svd": (None, "sum"),
    "magnitude_prune": ("magnitude", "sum"),
    "ties": ("magnitude", "ties"),
    "dare_linear": ("random", "sum"),
    "dare_ties": ("random", "ties"),
}


def combine(
    adapters: Sequence[Any],
    weights: Sequence[float],
    *,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: str = "total",
    key: jax.Array | None = None,
) -> Any:
    """Combines LoRA adapters over one base into a new LoRA adapter (see the module doc).

    Args:
      adapters: parameter trees over the same base, each with
        :class:`jpeft.lora.LoraWeight` nodes (targets, layers and ranks may differ, within
        what `combination_type` allows).
      weights: one weight per adapter, of any sign.
      combination_type: one of :data:`COMBINATION_TYPES`; with a single adapter, ``linear``
        is used whatever is asked (as PEFT).
      svd_rank: the rank of an SVD type's result (default: the largest input rank).
      svd_clamp: a quantile in [0, 1] at which an SVD type's factors are clamped.
      svd_full_matrices: PEFT's option of the same name, accepted for its callers: only the
        leading `svd_rank` singular vectors are used, which the full and the reduced SVD
        share, so jpeft always computes the reduced one (half the time on CPU).
      density: the fraction of entries kept, in [0, 1] (``(0, 1]`` for DARE); required by
        the types that prune (``ties``, ``dare_*``, ``magnitude_prune``, and their SVD forms).
      majority_sign_method: ``"total"`` or ``"frequency"``, for ``ties`` and ``dare_ties``.
      key: a PRNG key for DARE's random pruning; required by the ``dare_*`` types.

    Returns:
      The first adapter's tree with a new :class:`jpeft.lora.LoraWeight` (scale 1 on its
      adapted layers, 0 elsewhere) on every module some adapter adapts, over the same base
      weight: ready for :func:`jpeft.lora.merge`, :func:`jpeft.save_adapter` and
      :func:`jpeft.hf.export_peft`.

    Raises:
      ValueError: an unknown type or bad option; an adapter that is not LoRA (DoRA, another
        method, weights trained in full) or not over the first adapter's base; ranks that
        the type cannot combine. The message names the adapter's index and the module.
    """
    del svd_full_matrices  # the result does not depend on it (see Args)
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    _check_options(
        adapters, weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method
    )
    if len(adapters) == 1:
        combination_type = "linear"  # PEFT: nothing else is defined for one adapter
    if combination_type.startswith("dare") and key is None:
        raise ValueError(f"combination_type {combination_type!r} prunes at random: pass key=")
    entries = [_entries(i, params) for i, params in enumerate(adapters)]
    _check_same_base(entries)
    ranks = [max(v.rank for v in e.values() if isinstance(v, lora.LoraWeight)) for e in entries]
    if combination_type in FACTOR_TYPES and len(set(ranks)) > 1:
        raise ValueError(
            f"combination_type {combination_type!r} merges the factors themselves and needs "
            f"adapters of one rank; their ranks are {dict(enumerate(ranks))} (use 'cat' or an "
            "SVD type to combine different ranks)"
        )
    dropout = next(v.dropout for v in entries[0].values() if isinstance(v, lora.LoraWeight))
    options = _Options(
        combination_type,
        svd_rank or max(ranks),
        svd_clamp,
        density,
        majority_sign_method,
        key,
    )
    out = tree.copy_dicts(adapters[0])
    for keys, first in entries[0].items():
        members = [
            (i, e[keys]) for i, e in enumerate(entries) if isinstance(e[keys], lora.LoraWeight)
        ]
        if members:
            base = first.w if isinstance(first, lora.LoraWeight) else first
            node = _combine_module(keys, base, members, weights, ranks, options)
            tree.set_path(out, keys, dataclasses.replace(node, dropout=dropout))
    return out


@dataclasses.dataclass(frozen=True)
class _Options:
    combination_type: str
    svd_rank: int  # the rank of an SVD type's result
    svd_clamp: float | None
    density: float | None
    sign_method: str
    key: jax.Array | None


def _combine_module(
    keys: tuple, base: Any, members: list, weights: list[float], ranks: list[int], o: _Options
) -> lora.LoraWeight:
    """The combined node of one module from ``members``, the ``(index, node)`` of the
    adapters that adapt it (`ranks`: every adapter's largest rank)."""
    path = ".".join(map(str, keys))
    kind = o.combination_type
    lead = tuple(jnp.shape(members[0][1].scale))
    layers = np.stack([_layer_mask(node, lead) for _, node in members])  # [n, L]
    lambdas = np.array([weights[i] for i, _ in members])[:, None]  # [n, 1]
    if kind == "cat":
        a, b = _cat(members, lambdas, layers, ranks)
    elif kind in FACTOR_TYPES:
        a, b = _factor_merge(path, members, lambdas, layers, o)
    else:
        delta = _merge(
            jnp.stack([_flat(lora.delta_weight(node), lead) for _, node in members]),
            lambdas * layers,
            *_RULES[kind.removesuffix("_svd")],
            o.density,
            o.sign_method,
            _module_key(o.key, path),
            mask=layers,
        )
        delta = delta.reshape(-1, *_base_shape(base)[-2:])
        a, b = _svd_factors(delta, o.svd_rank, o.svd_clamp)
    union = layers.any(axis=0)
    adapted = tuple(int(i) for i in np.flatnonzero(union))
    # Zero factors where no adapter adapts a layer (an SVD of 0 has A = I, not 0).
    keep = jnp.asarray(union, jnp.float32)[:, None, None]
    return lora.LoraWeight(
        w=base,
        a=(a * keep).reshape(*lead, *a.shape[-2:]),
        b=(b * keep).reshape(*lead, *b.shape[-2:]),
        scale=jnp.asarray(union.reshape(lead), jnp.float32),
        layers=None if not lead or len(adapted) == lead[0] else adapted,
    )


def _check_options(
    adapters, weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method
) -> None:
    if not adapters:
        raise ValueError("combine needs at least one adapter")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters need {len(adapters)} weights, got {weights}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"unknown combination_type {combination_type!r}; expected one of {COMBINATION_TYPES}"
        )
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}"
        )
    prunes = combination_type not in ("cat", "linear", "svd")
    if prunes and density is None:
        raise ValueError(f"combination_type {combination_type!r} needs density in [0, 1]")
    if not prunes and density is not None:
        raise ValueError(
            f"density applies to the pruning types, not to {combination_type!r} "
            f"(got density={density})"
        )
    if density is not None:
        low_ok = density > 0 if combination_type.startswith("dare") else density >= 0
        if not (low_ok and density <= 1):
            interval = "(0, 1] (DARE divides by it)" if "dare" in combination_type else "[0, 1]"
            raise ValueError(f"density must be in {interval}, got {density}")
    if combination_type not in SVD_TYPES and (svd_rank is not None or svd_clamp is not None):
        raise ValueError(f"svd_rank and svd_clamp apply to the SVD types, not {combination_type!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"svd_clamp is a quantile in [0, 1], got {svd_clamp}")


def _entries(index: int, params: Any) -> dict[tuple, Any]:
    """``{keys: array or node}`` of adapter `index`, refusing nodes that are not plain LoRA."""
    from jpeft import dora  # here: jpeft.dora imports jpeft.lora, as this module does

    entries = dict(tree.iter_nodes(params))
    for keys, value in entries.items():
        path = ".".join(map(str, keys))
        if isinstance(value, dora.DoraWeight):
            raise ValueError(
                f"adapter {index} has a DoRA node at {path}; combinations are defined for "
                "plain LoRA adapters only (as in PEFT)"
            )
        if isinstance(value, tree.Trainable):
            raise ValueError(
                f"adapter {index} trains {path} in full (modules_to_save or a bias); only "
                "LoRA factors combine: drop it from the adapter first"
            )
        if (
            isinstance(value, tree.Node)
            and value.kind is not None
            and type(value) is not (lora.LoraWeight)
        ):
            raise ValueError(
                f"adapter {index} has a {value.kind!r} node at {path}; only LoRA adapters "
                "(jpeft.lora.LoraWeight) combine"
            )
    if not any(isinstance(v, lora.LoraWeight) for v in entries.values()):
        raise ValueError(f"adapter {index} holds no LoRA node (apply or load a LoRA adapter)")
    return entries


def _base_shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, lora.LoraWeight):
        value = value.w
    return tuple(nn.shape(value)) if isinstance(value, tree.Node) else tuple(jnp.shape(value))


def _check_same_base(entries: list[dict[tuple, Any]]) -> None:
    first = entries[0]
    for index, other in enumerate(entries[1:], start=1):
        for keys in first.keys() ^ other.keys():
            owner, lacking = (0, index) if keys in first else (index, 0)
            raise ValueError(
                f"adapter {index} is not over adapter 0's base: {'.'.join(map(str, keys))} is "
                f"in adapter {owner} but not in adapter {lacking}"
            )
        for keys, value in first.items():
            want, got = _base_shape(value), _base_shape(other[keys])
            if want != got:
                raise ValueError(
                    f"adapter {index} is not over adapter 0's base: "
                    f"{'.'.join(map(str, keys))} is {list(got)}, expected {list(want)}"
                )


def _layer_mask(node: lora.LoraWeight, lead: tuple[int, ...]) -> np.ndarray:
    """``[L]`` bool: the layers `node` adapts (``L = 1`` for an unstacked weight)."""
    if not lead:
        return np.ones(1, bool)
    mask = np.zeros(lead[0], bool)
    mask[list(node.layers) if node.layers is not None else slice(None)] = True
    return mask


def _flat(x: jax.Array, lead: tuple[int, ...]) -> jax.Array:
    """``[..., p, q]`` float32 as ``[L, p·q]`` (one row per layer)."""
    return jnp.asarray(x, jnp.float32).reshape(math.prod(lead), -1)


def _scales(node: lora.LoraWeight, lead: tuple[int, ...]) -> np.ndarray:
    return np.asarray(node.scale, np.float64).reshape(math.prod(lead))


def _module_key(key: jax.Array | None, path: str) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, zlib.crc32(path.encode()))


def _cat(members, lambdas, layers, ranks) -> tuple[jax.Array, jax.Array]:
    """``A = [λ_i s_i A_i | ...]: [L, in, R]``, ``B = [B_i; ...]: [L, R, out]``; adapter
    ``i`` fills ranks ``[Σ_{j<i} r_j, Σ_{j<i} r_j + r_i)`` (zeros where it does not adapt)."""
    node = members[0][1]
    lead = tuple(jnp.shape(node.scale))
    n_layers, fan_in, fan_out = math.prod(lead), node.a.shape[-2], node.b.shape[-1]
    a = jnp.zeros((n_layers, fan_in, sum(ranks)), jnp.float32)
    b = jnp.zeros((n_layers, sum(ranks), fan_out), jnp.float32)
    for (i, node), lam, adapted in zip(members, lambdas, layers, strict=True):
        factor = jnp.asarray(lam * _scales(node, lead) * adapted, jnp.float32)[:, None, None]
        start, r = sum(ranks[:i]), node.rank
        a_i = jnp.asarray(node.a, jnp.float32).reshape(n_layers, fan_in, r)
        b_i = jnp.asarray(node.b, jnp.float32).reshape(n_layers, r, fan_out)
        a = a.at[:, :, start : start + r].set(a_i * factor)
        b = b.at[:, start : start + r, :].set(b_i * jnp.asarray(adapted)[:, None, None])
    return a, b


def _factor_merge(path, members, lambdas, layers, o: _Options) -> tuple[jax.Array, jax.Array]:
    """The merge rule on the ``A`` factors with weights ``±√|λ s|`` and on the ``B``
    factors with ``√|λ s|`` (PEFT puts the sign on ``A`` only)."""
    node = members[0][1]
    lead = tuple(jnp.shape(node.scale))
    bad = {i: n.rank for i, n in members if n.rank != node.rank}
    if bad:
        raise ValueError(
            f"{path}: combination_type {o.combination_type!r} needs one rank per module; adapter "
            f"{members[0][0]} has rank {node.rank} there, adapters {bad}"
        )
    scaled = lambdas * np.stack([_scales(n, lead) for _, n in members]) * layers  # [n, L]
    root = np.sqrt(np.abs(scaled))
    prune, rule = _RULES[o.combination_type]
    key_a, key_b = (None, None) if o.key is None else jax.random.split(_module_key(o.key, path))
    sides = (("a", np.where(scaled >= 0, root, -root), key_a), ("b", root, key_b))
    merged = []
    for field, lam, side_key in sides:
        stacked = jnp.stack([_flat(getattr(n, field), lead) for _, n in members])
        merged.append(
            _merge(stacked, lam, prune, rule, o.density, o.sign_method, side_key, mask=layers)
        )
    a, b = merged
    return a.reshape(-1, *node.a.shape[-2:]), b.reshape(-1, *node.b.shape[-2:])


def _merge(
    tensors: jax.Array,
    lambdas: np.ndarray,
    prune: str | None,
    rule: str,
    density: float | None,
    sign_method: str,
    key: jax.Array | None,
    *,
    mask: np.ndarray,
) -> jax.Array:
    """One merge rule over ``tensors: [n, L, X]`` (adapter, layer, entries), ``lambdas:
    [n, L]``, each layer on its own; ``mask: [n, L]`` marks the adapters that adapt each
    layer (the others' tensors are 0, which takes no part in any rule). Returns ``[L, X]``."""
    tensors = tensors * jnp.asarray(mask, jnp.float32)[..., None]
    if prune is not None and density < 1:  # PEFT prunes nothing at density >= 1
        if prune == "magnitude":
            tensors = _magnitude_prune(tensors, density)
        else:
            keep = jax.random.bernoulli(key, density, tensors.shape)
            tensors = tensors * keep / jnp.float32(density)
    weighted = tensors * jnp.asarray(lambdas, jnp.float32)[..., None]
    if rule == "sum":
        return weighted.sum(axis=0)
    sign = jnp.sign(tensors)
    votes = tensors.sum(axis=0) if sign_method == "total" else sign.sum(axis=0)
    elected = sign == jnp.where(votes >= 0, 1.0, -1.0)  # [n, L, X]
    kept = (weighted * elected).sum(axis=0)
    return kept / jnp.maximum(elected.sum(axis=0), 1).astype(jnp.float32)


def _magnitude_prune(tensors: jax.Array, density: float) -> jax.Array:
    """Each row ``[..., X]`` keeps its ``k = ⌊density · X⌋`` entries largest in magnitude
    (of equal ones, the first), as ``torch.topk`` would choose them up to ties.

    The k-th largest magnitude is found by bisection on its float32 bits (an order-preserving
    integer for non-negative floats): 31 counting passes, where ``jax.lax.top_k`` with a large
    k sorts each row and takes ~4x as long on CPU.
    """
    k = int(density * tensors.shape[-1])  # PEFT's count, in Python floats
    if k == 0:
        return jnp.zeros_like(tensors)
    bits = jax.lax.bitcast_convert_type(jnp.abs(tensors), jnp.int32)

    def step(i, kth):  # sets bit 30 - i of the k-th largest where still at least k entries
        trial = kth | (1 << (30 - i))
        enough = (bits >= trial[..., None]).sum(axis=-1) >= k
        return jnp.where(enough, trial, kth)

    kth = jax.lax.fori_loop(0, 31, step, jnp.zeros(bits.shape[:-1], jnp.int32))[..., None]
    above = bits > kth
    tied = bits == kth
    room = k - above.sum(axis=-1, keepdims=True)  # how many of the tied ones to keep
    keep = above | (tied & (jnp.cumsum(tied, axis=-1) <= room))
    return jnp.where(keep, tensors, 0.0)


def _svd_factors(delta: jax.Array, rank: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
    """``(A: [L, in, rank], B: [L, rank, out])`` from ``delta: [L, in, out]``: PEFT's
    truncated SVD of ``deltaᵀ`` (zero-padded to `rank` past ``min(in, out)``)."""
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(delta, -1, -2), full_matrices=False)
    k = min(rank, s.shape[-1])
    up = u[..., :, :k] * s[..., None, :k]  # [L, out, k]: PEFT's lora_B
    down = vh[..., :k, :]  # [L, k, in]: PEFT's lora_A
    if clamp is not None:
        entries = jnp.concatenate([up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)], 1)
        high = jnp.quantile(entries, clamp, axis=1)[:, None, None]  # linear, as torch's
        up, down = jnp.clip(up, -high, high), jnp.clip(down, -high, high)
    pad = ((0, 0), (0, 0), (0, rank - k))
    a = jnp.pad(jnp.swapaxes(down, -1, -2), pad)
    b = jnp.pad(jnp.swapaxes(up, -1, -2), (pad[0], pad[2], pad[1]))
    return a, b
