"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020; He et al., 2021), as
AdapterHub's ``adapters`` library defines them for Llama and GPT-2.

A bottleneck adapter is a small two-layer MLP with ``m = d // reduction_factor`` units,

    A(z) = s · (act(z @ D + b_D) @ U + b_U),     D: [d, m], U: [m, d],

placed after the attention (``mh_adapter``) and/or after the MLP (``output_adapter``) of every
layer. Let ``o`` be that sublayer's output (its output projection, bias included) and ``h`` the
block's input, the residual stream the sublayer's output is added to. AdapterHub's
``BnConfig`` options then mean, in a pre-norm model such as Llama and GPT-2, whose layer norms
sit inside the sublayers so that AdapterHub's "original layer norm" is the residual add
alone::

    sequential (is_parallel=False):
        z   = o + h  if original_ln_before  else o      # the adapter's input
        r   = o      if residual_before_ln  else z      # the adapter's own residual
        out = A(z) + r (+ h if original_ln_after)
    parallel (is_parallel=True):
        out = o + A(h) (+ h if original_ln_after)

The presets are AdapterHub's: :class:`SeqBnConfig` (Pfeiffer, the default:
``h + o + A(h + o)`` after the MLP), :class:`DoubleSeqBnConfig` (Houlsby: ``h + o + A(o)``
after the attention and after the MLP) and :class:`ParBnConfig` (He et al.:
``h + o + 4·A(h)`` after the MLP). Other combinations compute what AdapterHub computes even
where that drops or doubles the residual stream (``original_ln_after=False`` without
``original_ln_before``, say).

Where it hooks in: the adapter of a sublayer is a :class:`BottleneckAdapter` node wrapping the
weight of that sublayer's output projection (``self_attn.o_proj`` and ``mlp.down_proj`` in
Llama, ``attn.c_proj`` and ``mlp.c_proj`` in GPT-2: the models' ``attention_output_path`` and
``mlp_output_path``). The models add those projections to the residual stream with
:func:`jpeft.nn.residual`, whose rule for this node sees both ``o`` and ``h``. The node leaves
the projection's weight as it is, so nothing folds into the weights: merging refuses it.

Initialisation (``init_weights``), as AdapterHub's: ``"bert"`` draws ``D`` and ``U`` from
``N(0, 0.02²)``; ``"mam_adapter"`` draws ``D`` from ``U(±1/√d)`` (torch's kaiming-uniform)
and zeroes ``U``, the one init whose adapted model starts equal to the base;
``"houlsby"`` draws both from ``N(0, 0.01²)`` truncated at ±2σ. Biases start at zero.
``scaling`` is ``s``, or ``"learned"`` (a trained scalar ``s``, from 1) or ``"channel"`` (a
trained ``s: [d]``, from ones). Unlike AdapterHub, which quietly keeps one unit, a
`reduction_factor` that leaves no unit (``d // reduction_factor < 1``) is an error.

Example::

    params = jpeft.bottleneck.apply(params, model=model, key=jax.random.key(0),
                                    config=jpeft.bottleneck.DoubleSeqBnConfig())
    trainable, frozen = jpeft.split(params)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jpeft import methods, nn, tree

INIT_WEIGHTS = ("bert", "mam_adapter", "houlsby")
LEARNED_SCALINGS = ("learned", "channel")
# AdapterHub applies transformers' activation of the lower-cased name (and its own
# "leakyrelu"); these are the ones jpeft has.
ACTIVATIONS = {
    **nn.ACTIVATIONS,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "leakyrelu": jax.nn.leaky_relu,  # torch's default slope, 0.01, as jax's
}
LOCATIONS = {"mh_adapter": "attention_output_path", "output_adapter": "mlp_output_path"}
"""Each placement option and the model attribute naming the projection its adapter wraps."""
# AdapterHub BnConfig options jpeft does not implement, with the value that means "off".
_UNSUPPORTED = {
    "ln_before": False,
    "ln_after": False,
    "use_gating": False,
    "leave_out": (),
    "dropout": 0.0,
    "phm_layer": False,
    "inv_adapter": None,
    "cross_adapter": False,
    "stochastic_depth": 0.0,
}


def _parse_scaling(text: Any) -> float | str:
    """``--scaling``: a number, or a word (:class:`BnConfig` takes ``learned``/``channel``)."""
    try:
        return float(text)
    except ValueError:
        return str(text).strip()


@dataclasses.dataclass(frozen=True, kw_only=True)
class BnConfig:
    """Bottleneck-adapter settings with AdapterHub's ``BnConfig`` field names; the defaults
    are its default adapter's, ``SeqBnConfig`` (Pfeiffer).

    Attributes:
      mh_adapter: an adapter after each layer's attention.
      output_adapter: an adapter after each layer's MLP.
      reduction_factor: the hidden size over the adapter's width (``m = d // factor``).
      non_linearity: the activation between the two projections (see :data:`ACTIVATIONS`).
      original_ln_before: a sequential adapter takes the sublayer's output plus the
        residual stream (``o + h``) instead of the output alone (see the module docstring).
      original_ln_after: the residual stream is added after the adapter.
      residual_before_ln: a sequential adapter's own residual is the sublayer's output
        ``o`` (True) or its input ``z`` (False). AdapterHub's ``"post_add"`` needs a layer
        norm after the residual add, which pre-norm models do not have (AdapterHub fails
        on it there): refused.
      init_weights: ``"bert"``, ``"mam_adapter"`` or ``"houlsby"`` (see the module).
      is_parallel: a parallel adapter, fed the block's input ``h``.
      scaling: the adapter output's factor ``s``, or ``"learned"``/``"channel"`` for a
        trained scalar or per-channel one.
      adapter_residual_before_ln: only changes anything with ``ln_after``; kept for
        AdapterHub's files.
      ln_before, ln_after, use_gating, leave_out, dropout, phm_layer, inv_adapter,
        cross_adapter, stochastic_depth: AdapterHub options jpeft does not implement;
        anything but their "off" value is refused.
    """

    mh_adapter: bool = dataclasses.field(
        default=False, metadata={"help": "an adapter after each layer's attention"}
    )
    output_adapter: bool = dataclasses.field(
        default=True, metadata={"help": "an adapter after each layer's MLP"}
    )
    reduction_factor: float = dataclasses.field(
        default=16,
        metadata={"help": "hidden size over adapter width (width = hidden // factor)"},
    )
    non_linearity: str = dataclasses.field(
        default="relu", metadata={"help": "the adapter's activation (relu, swish, gelu, ...)"}
    )
    original_ln_before: bool = dataclasses.field(
        default=True,
        metadata={"help": "a sequential adapter takes sublayer output + residual stream"},
    )
    original_ln_after: bool = dataclasses.field(
        default=True, metadata={"help": "add the residual stream after the adapter"}
    )
    residual_before_ln: bool = dataclasses.field(
        default=True,
        metadata={"help": "a sequential adapter's residual is the sublayer output"},
    )
    init_weights: str = dataclasses.field(
        default="bert",
        metadata={"help": "adapter initialisation", "choices": INIT_WEIGHTS},
    )
    is_parallel: bool = dataclasses.field(
        default=False, metadata={"help": "parallel adapters, fed the block's input"}
    )
    scaling: float | str = dataclasses.field(
        default=1.0,
        metadata={
            "help": "factor on the adapter's output, or 'learned' / 'channel' (trained)",
            "parse": _parse_scaling,
            "metavar": "S|learned|channel",
        },
    )
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    use_gating: bool = False
    leave_out: tuple[int, ...] = ()
    dropout: float = 0.0
    phm_layer: bool = False
    inv_adapter: str | None = None
    cross_adapter: bool = False
    stochastic_depth: float = 0.0

    def __post_init__(self):
        if isinstance(self.leave_out, list):
            object.__setattr__(self, "leave_out", tuple(self.leave_out))
        for name, off in _UNSUPPORTED.items():
            if getattr(self, name) != off:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported by jpeft's bottleneck "
                    f"adapters; expected {off!r}"
                )
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("mh_adapter and output_adapter are both False: no adapter to add")
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
            raise ValueError(
                f"reduction_factor must be a positive number (one for every layer), got {rf!r}"
            )
        if self.non_linearity.lower() not in ACTIVATIONS:
            raise ValueError(
                f"unknown non_linearity {self.non_linearity!r}; expected one of "
                f"{sorted(ACTIVATIONS)}"
            )
        if self.init_weights not in INIT_WEIGHTS:
            raise ValueError(f"init_weights {self.init_weights!r} is not one of {INIT_WEIGHTS}")
        if not isinstance(self.residual_before_ln, bool):
            raise ValueError(
                f"residual_before_ln={self.residual_before_ln!r} is not supported: expected "
                "True or False ('post_add' needs a layer norm after the residual add, which "
                "pre-norm models such as Llama and GPT-2 do not have)"
            )
        s = self.scaling
        if isinstance(s, bool) or not (isinstance(s, (int, float)) or s in LEARNED_SCALINGS):
            raise ValueError(f"scaling {s!r} is neither a number nor one of {LEARNED_SCALINGS}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeqBnConfig(BnConfig):
    """AdapterHub's ``SeqBnConfig`` (Pfeiffer et al., 2020): ``h + o + A(h + o)`` after the
    MLP, 16x reduction, ReLU. The same as :class:`BnConfig`'s defaults."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoubleSeqBnConfig(BnConfig):
    """AdapterHub's ``DoubleSeqBnConfig`` (Houlsby et al., 2019): ``h + o + A(o)`` after the
    attention and after the MLP, 16x reduction, swish."""

    mh_adapter: bool = True
    original_ln_before: bool = False
    non_linearity: str = "swish"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParBnConfig(BnConfig):
    """AdapterHub's ``ParBnConfig`` (He et al., 2021): ``h + o + 4·A(h)`` after the MLP, 2x
    reduction, ReLU, ``mam_adapter`` init (an identity at init)."""

    original_ln_before: bool = False
    reduction_factor: float = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float | str = 4.0


PRESETS = {"seq_bn": SeqBnConfig, "double_seq_bn": DoubleSeqBnConfig, "par_bn": ParBnConfig}
"""AdapterHub's names of the presets (``model.add_adapter(name, config="seq_bn")``)."""


@tree.node
class BottleneckAdapter(tree.Node):
    """A bottleneck adapter on a sublayer, wrapping the weight of the sublayer's output
    projection (see the module docstring for what :func:`jpeft.nn.residual` computes).

    Attributes:
      w: the projection's frozen weight ``[..., in, d]`` (an array or a node).
      down: ``D: [..., d, m]``; down_bias: ``b_D: [..., m]``.
      up: ``U: [..., m, d]``; up_bias: ``b_U: [..., d]``.
      learned_scaling: the trained ``s``, ``[..., 1]`` (``"learned"``) or ``[..., d]``
        (``"channel"``), or None for the constant `scaling`.
      scaling: the constant ``s`` (1 with a learned one).
      non_linearity, is_parallel, original_ln_before, original_ln_after,
        residual_before_ln: the :class:`BnConfig` options of the same names.
    """

    w: Any
    down: jax.Array
    down_bias: jax.Array
    up: jax.Array
    up_bias: jax.Array
    learned_scaling: jax.Array | None = None
    scaling: float = tree.static(1.0)
    non_linearity: str = tree.static("relu")
    is_parallel: bool = tree.static(False)
    original_ln_before: bool = tree.static(True)
    original_ln_after: bool = tree.static(True)
    residual_before_ln: bool = tree.static(True)

    kind: ClassVar[str] = "bottleneck"
    trainable_fields: ClassVar[tuple[str, ...]] = (
        "down",
        "down_bias",
        "up",
        "up_bias",
        "learned_scaling",
    )
    base_field: ClassVar[str] = "w"

    def adapted_shape(self) -> tuple[int, ...]:
        return (*self.up.shape[:-2], -1, self.up.shape[-1])  # -1: any fan-in

    def identity(self, base: Any) -> BottleneckAdapter:
        """Zero weights: ``A = 0``, which leaves ``h + o`` (the block without an adapter)
        in every configuration where the adapter's residual is the sublayer's output.

        Raises:
          ValueError: ``original_ln_after=False``, or ``residual_before_ln=False`` with
            ``original_ln_before=True``: there ``A = 0`` still changes the block.
        """
        keeps_block = self.original_ln_after and (
            self.is_parallel or self.residual_before_ln or not self.original_ln_before
        )
        if not keeps_block:
            raise ValueError(
                "a bottleneck adapter with original_ln_after=False, or residual_before_ln="
                "False after original_ln_before, changes the block even with zero weights: "
                "it has no identity setting for the slots of adapters that leave it out"
            )
        zero = {
            name: jnp.zeros_like(getattr(self, name))
            for name in ("down", "down_bias", "up", "up_bias")
        }
        return dataclasses.replace(self, w=None, **zero)


@nn.register("residual", BottleneckAdapter)
def _residual(h: jax.Array, x: jax.Array, node: BottleneckAdapter, bias: Any) -> jax.Array:
    return adapt(h, nn.linear(x, node.w, bias), node)


def adapt(h: jax.Array, o: jax.Array, node: BottleneckAdapter) -> jax.Array:
    """The block's residual stream after a sublayer with an adapter: `h` the block's input,
    `o` the sublayer's output, both ``[..., d]`` (the maths in the module docstring)."""
    if node.is_parallel:
        out = o + bottleneck(h, node)
    else:
        z = o + h if node.original_ln_before else o
        out = bottleneck(z, node) + (o if node.residual_before_ln else z)
    return out + h if node.original_ln_after else out


def bottleneck(z: jax.Array, node: BottleneckAdapter) -> jax.Array:
    """``A(z) = s · (act(z @ D + b_D) @ U + b_U)`` in `z`'s dtype."""
    dtype = z.dtype
    # One token axis: the weight gradients then contract over a single axis (faster on
    # XLA:CPU, as LoRA's factors: bench/README.md).
    rows = z.reshape(-1, z.shape[-1])
    hidden = rows @ node.down.astype(dtype) + node.down_bias.astype(dtype)
    hidden = ACTIVATIONS[node.non_linearity](hidden)
    out = hidden @ node.up.astype(dtype) + node.up_bias.astype(dtype)
    scale = node.scaling if node.learned_scaling is None else node.learned_scaling.astype(dtype)
    return (out * scale).reshape(z.shape)


def bottleneck_size(hidden: int, reduction_factor: float) -> int:
    """``m = hidden // reduction_factor``, AdapterHub's adapter width.

    Raises:
      ValueError: the factor leaves no unit (AdapterHub would quietly keep one).
    """
    units = int(hidden // reduction_factor)
    if units < 1:
        raise ValueError(
            f"reduction_factor={reduction_factor} leaves no bottleneck unit for hidden size "
            f"{hidden} (hidden // reduction_factor = {units}); expected at most {hidden}"
        )
    return units


def placements(model: Any, config: BnConfig | None = None) -> dict[str, tuple[str, ...]]:
    """``{option: module path}`` of the projections `config` (None: any config) puts
    adapters on in a tree of `model` (a jpeft model or its class), e.g.
    ``{"output_adapter": ("model", "layers", "mlp", "down_proj")}``."""
    return {
        option: tuple(model.layers_path) + tuple(getattr(model, attribute))
        for option, attribute in LOCATIONS.items()
        if config is None or getattr(config, option)
    }


def apply(
    params: dict, *, model: Any, key: jax.Array, config: BnConfig | None = None, **options: Any
) -> dict:
    """Adds bottleneck adapters to a jpeft model's parameter tree.

    Args:
      params: the model's tree.
      model: its jpeft model (which projections close its sublayers).
      key: PRNG key for the initialisation.
      config: a :class:`BnConfig` (or a preset), or its fields as `options`.

    Returns:
      The tree with :class:`BottleneckAdapter` nodes on the chosen output projections.

    Raises:
      ValueError: bad options, a reduction factor that leaves no unit, a tree without the
        model's projections, or one that already has adapters there.
    """
    if config is None:
        config = BnConfig(**options)
    elif options:
        raise ValueError("pass either config or its fields as options, not both")
    new = tree.copy_dicts(params)
    chosen = placements(model, config)
    for path, path_key in zip(chosen.values(), jax.random.split(key, len(chosen)), strict=True):
        name = ".".join(path)
        try:
            entry = tree.get_path(new, path)
        except (KeyError, TypeError):
            raise ValueError(f"the tree has no {name} ({type(model).__name__})") from None
        if isinstance(entry["weight"], BottleneckAdapter):
            raise ValueError(f"{name} already has a bottleneck adapter")
        entry["weight"] = _init_node(entry["weight"], config, path_key)
    return new


def _init_node(weight: Any, config: BnConfig, key: jax.Array) -> BottleneckAdapter:
    *lead, _, hidden = nn.shape(weight)
    units = bottleneck_size(hidden, config.reduction_factor)
    key_down, key_up = jax.random.split(key)
    down_shape, up_shape = (*lead, hidden, units), (*lead, units, hidden)
    if config.init_weights == "bert":
        down = 0.02 * jax.random.normal(key_down, down_shape, jnp.float32)
        up = 0.02 * jax.random.normal(key_up, up_shape, jnp.float32)
    elif config.init_weights == "mam_adapter":
        bound = 1 / math.sqrt(hidden)  # kaiming_uniform(a=√5) on torch's [m, d] weight
        down = jax.random.uniform(key_down, down_shape, jnp.float32, -bound, bound)
        up = jnp.zeros(up_shape, jnp.float32)
    else:  # houlsby: N(0, 0.01²) truncated at ±0.02
        down = 0.01 * jax.random.truncated_normal(key_down, -2.0, 2.0, down_shape, jnp.float32)
        up = 0.01 * jax.random.truncated_normal(key_up, -2.0, 2.0, up_shape, jnp.float32)
    learned = None
    if config.scaling in LEARNED_SCALINGS:
        learned = jnp.ones((*lead, 1 if config.scaling == "learned" else hidden), jnp.float32)
    return make_node(
        weight,
        config,
        down=down,
        down_bias=jnp.zeros((*lead, units), jnp.float32),
        up=up,
        up_bias=jnp.zeros((*lead, hidden), jnp.float32),
        learned_scaling=learned,
    )


def make_node(
    weight: Any, config: BnConfig, *, down, down_bias, up, up_bias, learned_scaling=None
) -> BottleneckAdapter:
    """A :class:`BottleneckAdapter` on `weight` with these arrays and `config`'s options
    (`learned_scaling` is needed exactly when ``config.scaling`` is learned)."""
    if (learned_scaling is None) != (config.scaling not in LEARNED_SCALINGS):
        raise ValueError(
            f"scaling={config.scaling!r} "
            + ("needs a learned scaling array" if learned_scaling is None else "takes no array")
        )
    return BottleneckAdapter(
        w=weight,
        down=down,
        down_bias=down_bias,
        up=up,
        up_bias=up_bias,
        learned_scaling=learned_scaling,
        scaling=1.0 if learned_scaling is not None else float(config.scaling),
        non_linearity=config.non_linearity.lower(),
        is_parallel=config.is_parallel,
        original_ln_before=config.original_ln_before,
        original_ln_after=config.original_ln_after,
        residual_before_ln=config.residual_before_ln,
    )


methods.register(
    methods.Method(
        name="bottleneck",
        title="bottleneck adapters",
        config_class=BnConfig,
        apply=apply,
        identity_at_init=False,  # the default "bert" init draws U at random, as AdapterHub
    )
)
