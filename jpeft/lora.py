"""LoRA (Hu et al., 2021) as pure functions over a parameter tree.

A targeted linear weight ``W: [in, out]`` becomes a :class:`LoraWeight` node holding ``W``
(frozen) and the trainable factors ``A: [in, r]`` and ``B: [r, out]``; the layer computes

    y = x @ W + s · ((dropout(x) @ A) @ B),     s = α / r   (rsLoRA: α / √r)

factored, so ``W + s·A@B`` is never formed inside a training step. For a stacked weight
``[l, in, out]`` the factors are ``[l, in, r]``/``[l, r, out]`` and ``s`` is ``[l]``, zero for
layers that `layers_to_transform` leaves out (their factors get no gradient and are neither
counted nor exported).

Options, names and defaults are Hugging Face PEFT's ``LoraConfig``; initialisation is PEFT's:
``A`` kaiming-uniform (``U(±1/√in)``) and ``B = 0``, so the adapted model starts equal to the
base. ``use_dora=True`` makes the nodes :class:`jpeft.dora.DoraWeight` (weight-decomposed
LoRA, with a trained magnitude per output column).

Example::

    params = jpeft.lora.apply(params, rank=8, alpha=16, targets=["q_proj", "v_proj"],
                              key=jax.random.key(0))
    trainable, frozen = jpeft.split(params)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import matmul, methods, nn, tree
from jpeft import targets as targeting

_BIAS_MODES = ("none", "all", "lora_only")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA settings with Hugging Face PEFT's field names and defaults.

    Attributes:
      r: the rank.
      lora_alpha: α in the scale ``α / r``.
      target_modules: module names (suffix match), a full-match regex, ``"all-linear"``, or
        None for the model family's defaults (``q_proj``/``v_proj``; ``c_attn`` for GPT-2).
      exclude_modules: names or a regex never targeted.
      lora_dropout: dropout probability on the LoRA input path (training only).
      bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted
        layers train).
      use_rslora: scale by ``α / √r`` (rank-stabilised LoRA).
      use_dora: weight-decomposed LoRA (:mod:`jpeft.dora`): the nodes are
        :class:`jpeft.dora.DoraWeight`, with a trained magnitude per output column.
      init_lora_weights: True (kaiming-uniform A, zero B), ``"gaussian"`` (A normal with
        standard deviation ``1/r``, zero B) or False (A and B both random: not an identity,
        for tests).
      fan_in_fan_out: HF's flag for bases stored ``[in, out]`` (GPT-2's ``Conv1D``). jpeft
        stores every linear weight ``[in, out]`` and converts GPT-2 itself, so only False
        is accepted (True is an error rather than silently meaning nothing).
      layers_to_transform, layers_pattern: restrict targets to these layer indices.
      rank_pattern, alpha_pattern: per-module rank/alpha overrides (``(.*\\.)?(key)$``).
      modules_to_save: modules trained in full beside the adapter (e.g. ``["lm_head"]``).

    The fields with ``metadata["help"]`` are also ``jpeft train`` options (``--rank``,
    ``--alpha``, ``--targets``, ``--dropout``, ``--rslora``, ``--use-dora``, ``--layers``).
    """

    r: int = dataclasses.field(
        default=8, metadata={"help": "LoRA rank r", "flag": "--rank", "short": "-r", "metavar": "R"}
    )
    lora_alpha: float = dataclasses.field(
        default=8,
        metadata={
            "help": "LoRA alpha (the update is scaled by alpha/r, or alpha/sqrt(r) with --rslora)",
            "flag": "--alpha",
            "default_from": "r",
            "shown_default": "same as --rank",
        },
    )
    target_modules: str | tuple[str, ...] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "modules to adapt: names separated by commas (q_proj,v_proj; suffix "
            "match), 'all-linear', or a regex matched against the whole module name "
            "(model\\.layers\\.\\d+\\.self_attn\\.q_proj)",
            "flag": "--targets",
            "parse": targeting.parse_names,
            "metavar": "NAMES|REGEX",
            "shown_default": "the model family's, q_proj,v_proj",
        },
    )
    exclude_modules: str | tuple[str, ...] | None = None
    lora_dropout: float = dataclasses.field(
        default=0.0,
        metadata={
            "help": "dropout probability on the LoRA input",
            "flag": "--dropout",
            "metavar": "P",
        },
    )
    bias: str = "none"
    use_rslora: bool = dataclasses.field(
        default=False,
        metadata={"help": "rank-stabilised LoRA: scale by alpha/sqrt(r)", "flag": "--rslora"},
    )
    use_dora: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "DoRA: train a magnitude per output column of each adapted weight too "
            "(jpeft.dora)",
            "flag": "--use-dora",
        },
    )
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    layers_to_transform: int | tuple[int, ...] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "adapt only these layer indices: 0,1,2 or 0-3 or 0-3,8",
            "flag": "--layers",
            "parse": targeting.parse_layers,
            "metavar": "LIST",
            "shown_default": "all layers",
        },
    )
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self):
        targeting.freeze_name_lists(
            self,
            (
                "target_modules",
                "exclude_modules",
                "layers_to_transform",
                "layers_pattern",
                "modules_to_save",
            ),
        )
        targeting.refuse_fan_in_fan_out(self.fan_in_fan_out)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {_BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"unsupported init_lora_weights {self.init_lora_weights!r}; jpeft implements "
                "True, False and 'gaussian'"
            )
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"rank_pattern values must be positive integers, got {bad}")

    def __hash__(self) -> int:  # the pattern dicts are not hashable as they are
        fields = dataclasses.astuple(self)
        return hash(tuple(tuple(sorted(f.items())) if isinstance(f, dict) else f for f in fields))

    def scale(self, r: int, alpha: float) -> float:
        """``α / r``, or ``α / √r`` with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@tree.node
class LoraWeight(tree.Node):
    """A linear weight with a low-rank update: ``x @ w + scale · ((x @ a) @ b)``.

    Attributes:
      w: the frozen base weight ``[..., in, out]`` (an array or another node, e.g. NF4).
      a: ``[..., in, r]`` trainable.
      b: ``[..., r, out]`` trainable.
      scale: ``[...]`` float32 scale per layer (0 where a stacked layer is not adapted).
      dropout_key: PRNG keys ``[...]`` for input dropout, set only inside a training step
        (see :func:`jpeft.tree.with_rng`).
      dropout: the dropout probability.
      layers: the adapted layers of a stacked weight (None: every layer, or not stacked).
      rslora: whether `scale` is ``α / √r`` (recorded so that α can be recovered on export).
    """

    w: Any
    a: jax.Array
    b: jax.Array
    scale: jax.Array
    dropout_key: jax.Array | None = None
    dropout: float = tree.static(0.0)
    layers: tuple[int, ...] | None = tree.static(None)
    rslora: bool = tree.static(False)

    kind: ClassVar[str] = "lora"
    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b")
    base_field: ClassVar[str] = "w"
    rng_field: ClassVar[str] = "dropout_key"
    switch_fields: ClassVar[tuple[str, ...]] = ("scale",)  # DoRA too: scale 0 keeps W

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def rng_shape(self) -> tuple[int, ...] | None:
        return jnp.shape(self.scale) if self.dropout > 0 else None

    def adapted_shape(self) -> tuple[int, ...]:
        return (*self.a.shape[:-1], self.b.shape[-1])

    def identity(self, base: Any) -> LoraWeight:
        """Zero factors and scale: no update (DoRA's magnitude is then left unused)."""
        zero = {name: jnp.zeros_like(getattr(self, name)) for name in ("a", "b", "scale")}
        return dataclasses.replace(self, w=None, dropout_key=None, **zero)

    def alphas(self) -> np.ndarray:
        """``[...]`` α of each layer, recovered from `scale`."""
        return np.asarray(self.scale) * (math.sqrt(self.rank) if self.rslora else self.rank)

    def parameter_count(self) -> tuple[int, int]:
        base = tree.count_parameters(self.w)[1]
        adapter = self.a.size + self.b.size
        if self.layers is not None:
            adapter = adapter * len(self.layers) // self.a.shape[0]
        return adapter, base + adapter


@nn.register("linear", LoraWeight)
def _linear(x: jax.Array, node: LoraWeight) -> jax.Array:
    return nn.linear(x, node.w) + low_rank_update(dropout_input(x, node), node)


def dropout_input(x: jax.Array, node: LoraWeight) -> jax.Array:
    """`x` with the node's dropout applied (inside a training step), else `x` itself."""
    if node.dropout_key is None or node.dropout == 0:
        return x
    keep = jax.random.bernoulli(node.dropout_key, 1 - node.dropout, x.shape)
    return jnp.where(keep, x / (1 - node.dropout), 0).astype(x.dtype)


def low_rank_update(x: jax.Array, node: LoraWeight) -> jax.Array:
    """``s · (x @ A) @ B`` in `x`'s dtype, factored."""
    a, b = node.a.astype(x.dtype), node.b.astype(x.dtype)
    if x.ndim > 2 and a.ndim == 2:
        # One token axis: the gradients of A and B then contract over a single axis.
        # Contracting over [batch, seq] at once is ~2.5x slower on XLA:CPU in float32
        # (bench/README.md).
        rows = x.reshape(-1, x.shape[-1])
        delta = matmul.matmul(matmul.matmul(rows, a), b).reshape(*x.shape[:-1], b.shape[-1])
    else:
        delta = (x @ a) @ b
    return delta * node.scale.astype(x.dtype)


def delta_weight(node: LoraWeight) -> jax.Array:
    """``s · A @ B``, ``[..., in, out]`` float32: what the adapter adds to the weight."""
    delta = jnp.einsum("...ir,...ro->...io", node.a, node.b)
    return delta.astype(jnp.float32) * jnp.asarray(node.scale, jnp.float32)[..., None, None]


@nn.register("value", LoraWeight)
def _merged(node: LoraWeight) -> jax.Array:
    w = nn.value(node.w)
    return (w.astype(jnp.float32) + delta_weight(node)).astype(w.dtype)


def apply(
    params: dict,
    *,
    key: jax.Array,
    rank: int = 8,
    alpha: float | None = None,
    targets: str | Sequence[str] | None = None,
    config: LoraConfig | None = None,
    **options: Any,
) -> dict:
    """Adds LoRA to the targeted linear weights of a parameter tree.

    Args:
      params: a parameter tree (jpeft model or any nested dict of ``[in, out]`` weights).
      rank: ``r``; ignored when `config` is given.
      alpha: ``lora_alpha``; defaults to `rank` (scale 1, as HF's defaults r=8, α=8).
      targets: ``target_modules`` (see :class:`LoraConfig`).
      key: PRNG key for the initialisation of ``A`` (and ``B`` when not zero).
      config: a full :class:`LoraConfig` instead of `rank`/`alpha`/`targets`/`options`.
      **options: any other :class:`LoraConfig` field.

    Returns:
      The same tree with :class:`LoraWeight` nodes in place of the targeted weights (and
      :class:`jpeft.tree.Trainable` wrappers for trained biases and `modules_to_save`).

    Raises:
      ValueError: targets that match nothing (with close names), unsupported options.
    """
    if config is None:
        config = LoraConfig(
            r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=targets, **options
        )
    elif targets is not None or options:
        raise ValueError("pass either config or rank/alpha/targets/options, not both")
    selected = targets_of(params, config)
    new = tree.copy_dicts(params)
    weights = [tree.get_path(new, m.path)[m.weight_key] for m, _ in selected]
    shapes = tuple(
        (*nn.shape(w)[:-2], _rank(w, m, layers, config), *nn.shape(w)[-2:])
        for w, (m, layers) in zip(weights, selected, strict=True)
    )
    factors = _initial_factors(key, shapes, config.init_lora_weights)
    for (module, layers), weight, (a, b) in zip(selected, weights, factors, strict=True):
        entry = tree.get_path(new, module.path)
        entry[module.weight_key] = _init_node(weight, a, b, module, layers, config)
        if config.bias == "lora_only" and "bias" in entry:
            if module.stacked and len(layers) != len(module.names):
                raise ValueError(
                    "bias='lora_only' with layers_to_transform is not supported "
                    f"({module.names[0]})"
                )
            entry["bias"] = tree.Trainable(entry["bias"])
    if config.bias == "all":
        for module in targeting.modules(new):
            entry = tree.get_path(new, module.path)
            if "bias" in entry and not isinstance(entry["bias"], tree.Trainable):
                entry["bias"] = tree.Trainable(entry["bias"])
    if config.modules_to_save:
        mark_modules_to_save(new, config.modules_to_save)
    return new


def targets_of(params: dict, config: LoraConfig) -> list[tuple[targeting.Module, tuple[int, ...]]]:
    """The modules `config` adapts in `params`, each with its selected layer indices."""
    return targeting.select(
        params,
        config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        modules_to_save=config.modules_to_save,
    )


def _rank(
    weight: Any, module: targeting.Module, layers: tuple[int, ...], config: LoraConfig
) -> int:
    """The rank `config` gives `module` (one for all its selected layers)."""
    if isinstance(weight, LoraWeight):
        raise ValueError(f"{module.names[0]} already has a LoRA adapter")
    names = [module.names[i] for i in layers]
    ranks = {targeting.pattern_value(config.rank_pattern, n, config.r) for n in names}
    if len(ranks) > 1:
        raise ValueError(
            f"rank_pattern gives the layers of {module.names[0]} different ranks "
            f"{sorted(ranks)}; jpeft needs one rank per stacked module"
        )
    (r,) = ranks
    return r


def _initial_factors(
    key: jax.Array, shapes: tuple[tuple[int, ...], ...], init: bool | str
) -> list[tuple[jax.Array, jax.Array]]:
    """PEFT's initial ``A: [*lead, in, r]`` and ``B: [*lead, r, out]`` for each
    ``(*lead, r, in, out)`` of `shapes`: all modules' A from one draw of random numbers (and
    all random B from a second), cut into the factors on the host. One draw per module
    compiled a random-number program per module (1.5 s for a Llama's seven linears; made one
    by one, eagerly, 15 small programs, 2-3 s); cutting inside the draw's program made XLA
    generate the draw into each cut (0.45 s to compile against 0.17 s)."""
    a_shapes = [(*lead, fan_in, r) for *lead, r, fan_in, _ in shapes]
    b_shapes = [(*lead, r, fan_out) for *lead, r, _, fan_out in shapes]
    if init == "gaussian":  # standard deviation 1/r
        a = _draws(jax.random.normal, key, 0, a_shapes, lambda s: s[-1])
    else:  # kaiming_uniform(a=√5) on A[r, in], as torch's Linear: U(±1/√in)
        a = _draws(_uniform, key, 0, a_shapes, lambda s: math.sqrt(s[-2]))
    if init is False:  # U(±1/√r)
        b = _draws(_uniform, key, 1, b_shapes, lambda s: math.sqrt(s[-2]))
    else:
        b = [jax.device_put(np.zeros(s, np.float32)) for s in b_shapes]
    return list(zip(a, b, strict=True))


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _draw(draw: Any, key: jax.Array, part: int, size: int) -> jax.Array:
    return draw(jax.random.split(key)[part], (size,))


def _draws(
    draw: Any, key: jax.Array, part: int, shapes: list[tuple[int, ...]], divisor: Any
) -> list[jax.Array]:
    """Arrays of `shapes` cut from one `draw(jax.random.split(key)[part], [total])`, each
    divided by ``divisor(shape)`` (an exact float32 quotient)."""
    sizes = [math.prod(s) for s in shapes]
    flat = _draw(draw, key, part, sum(sizes))
    if not isinstance(flat, jax.core.Tracer):  # traced (jax.eval_shape, jit): cut in the trace
        flat = np.asarray(flat)
    offsets = np.cumsum([0, *sizes])[:-1]
    return [
        jax.device_put(flat[o : o + n].reshape(s) / np.float32(divisor(s)))
        for o, n, s in zip(offsets, sizes, shapes, strict=True)
    ]


def _init_node(
    weight: Any,
    a: jax.Array,
    b: jax.Array,
    module: targeting.Module,
    layers: tuple[int, ...],
    config: LoraConfig,
) -> LoraWeight:
    r = a.shape[-1]
    lead = nn.shape(weight)[:-2]
    scale = np.zeros(lead, np.float32)
    for i in layers:
        alpha = targeting.pattern_value(config.alpha_pattern, module.names[i], config.lora_alpha)
        scale[(i,) if module.stacked else ()] = config.scale(r, alpha)
    all_layers = not module.stacked or len(layers) == len(module.names)
    node = LoraWeight(
        w=weight,
        a=a,
        b=b,
        scale=jnp.asarray(scale),
        dropout=float(config.lora_dropout),
        layers=None if all_layers else tuple(layers),
        rslora=config.use_rslora,
    )
    if config.use_dora:
        from jpeft import dora  # here, not at the top: jpeft.dora imports this module

        return dora.decompose(node)
    return node


def mark_modules_to_save(params: dict, names: Sequence[str]) -> None:
    """Marks the weights (and biases) of the modules named in `names` (suffix match) as
    trained in full beside the adapter, in place, as PEFT's ``modules_to_save`` (any
    method's: IA3 uses it too)."""
    found = [
        m for m in targeting.modules(params) if any(n.endswith(s) for n in m.names for s in names)
    ]
    if not found:
        raise ValueError(
            f"modules_to_save {list(names)} match no module of the tree (a tied output head "
            "has no module of its own: name the embedding instead)"
        )
    for module in found:
        entry = tree.get_path(params, module.path)
        for leaf in (module.weight_key, "bias"):
            if leaf in entry and not isinstance(entry[leaf], tree.Node):
                entry[leaf] = tree.Trainable(entry[leaf], copied=True)


def merge(params: dict) -> dict:
    """Folds every adapter into its base weight: a plain tree of arrays for serving.

    ``W + s·A@B`` (DoRA: its columns rescaled to the magnitude, :mod:`jpeft.dora`) is
    computed in float32 and stored in ``W``'s dtype; trained biases and `modules_to_save`
    weights become plain arrays.
    """
    return tree.materialize(params)


extract = tree.extract
"""The adapter alone (:func:`jpeft.tree.extract`): the LoRA nodes without their base weight
and the trained weights whole. Small enough to save."""

attach = tree.attach
"""Puts an adapter from :func:`extract` back onto a base tree (:func:`jpeft.tree.attach`)."""


def _apply_method(params: dict, *, config: LoraConfig, key: jax.Array, model: Any) -> dict:
    """:func:`apply` under the method protocol (LoRA needs no model: the tree is enough)."""
    return apply(params, config=config, key=key)


methods.register(
    methods.Method(
        name="lora", title="LoRA", config_class=LoraConfig, apply=_apply_method, peft_type="LORA"
    )
)
