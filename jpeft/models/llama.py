"""The Llama family: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM, TinyLlama.

One pre-norm block per layer::

    h = h + o_proj(attention(rope(q_proj(rms(h))), rope(k_proj(rms(h))), v_proj(rms(h))))
    h = h + down_proj(act(gate_proj(rms(h))) * up_proj(rms(h)))

with grouped-query attention, RoPE (``default``, ``linear`` or ``llama3`` scaling), optional
q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3) and sliding-window layers (Mistral,
Qwen). Tree paths and names are Hugging Face's (``model.layers.self_attn.q_proj.weight``,
stacked ``[l, in, out]``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jpeft import nn
from jpeft.models import decoder

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Architecture of a Llama-family model, with transformers' field names.

    Built from a ``config.json`` dict by :meth:`from_hf`, which rejects options jpeft does
    not implement rather than ignoring them.
    """

    model_type: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: nn.RopeParameters = nn.RopeParameters()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; expected one of {MODEL_TYPES}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        nn.activation(self.hidden_act)  # fails early on an unknown activation
        if len(self.sliding_windows) not in (0, self.num_hidden_layers):
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries, expected "
                f"{self.num_hidden_layers} (one per layer)"
            )

    @classmethod
    def from_hf(cls, config: dict) -> LlamaConfig:
        """From a transformers ``config.json`` dict (v4 or v5 field names)."""
        model_type = config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; expected one of {MODEL_TYPES}"
            )
        if config.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"unsupported pretraining_tp {config['pretraining_tp']}; expected 1")
        heads = config["num_attention_heads"]
        eos = config.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            hidden_act=config.get("hidden_act", "silu"),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_parameters=nn.RopeParameters.from_hf(config),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases; Llama and Qwen3 say so in attention_bias.
            attention_bias=model_type == "qwen2" or config.get("attention_bias", False),
            mlp_bias=config.get("mlp_bias", False),
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows(config),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=config.get("pad_token_id"),
        )


def _sliding_windows(config: dict) -> tuple[int | None, ...]:
    """Per-layer sliding window (None for full attention), as transformers decides it."""
    layers = config["num_hidden_layers"]
    window = config.get("sliding_window")
    if config.get("model_type") == "mistral":
        return (window,) * layers if window else ()
    layer_types = config.get("layer_types")
    if layer_types:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"unsupported layer_types {sorted(unknown)}")
        if "sliding_attention" not in layer_types:
            return ()
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if config.get("use_sliding_window") and window:
        first = config.get("max_window_layers", layers)
        return tuple(window if i >= first else None for i in range(layers))
    return ()


_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclasses.dataclass(frozen=True)
class Llama(decoder.DecoderLM):
    """A Llama-family causal LM over a parameter tree (see :class:`decoder.DecoderLM`)."""

    config: LlamaConfig
    layers_path: ClassVar[tuple[str, ...]] = ("model", "layers")
    embed_path: ClassVar[tuple[str, ...]] = ("model", "embed_tokens")
    attention_output_path: ClassVar[tuple[str, ...]] = ("self_attn", "o_proj")
    mlp_output_path: ClassVar[tuple[str, ...]] = ("mlp", "down_proj")
    _hf_ignored: ClassVar[tuple[str, ...]] = (r"rotary_emb\.inv_freq$",)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    def layer_windows(self) -> np.ndarray:
        if not self.config.sliding_windows:
            return super().layer_windows()
        full = decoder.FULL_ATTENTION
        return np.array([w or full for w in self.config.sliding_windows], np.int32)

    def _embed(self, params, tokens, positions):
        if tokens.ndim == 3:  # inputs_embeds
            return tokens
        return nn.embed(tokens, params["model"]["embed_tokens"]["weight"])

    def _qkv(self, layer, h, positions):
        c = self.config
        attn = layer["self_attn"]
        x = nn.rms_norm(h, layer["input_layernorm"]["weight"], c.rms_norm_eps)
        batch, steps = x.shape[:2]
        q, k, v = (
            nn.linear(x, attn[name]["weight"], attn[name].get("bias")).reshape(
                batch, steps, heads, c.head_dim
            )
            for name, heads in (
                ("q_proj", c.num_attention_heads),
                ("k_proj", c.num_key_value_heads),
                ("v_proj", c.num_key_value_heads),
            )
        )
        if c.qk_norm:
            q = nn.rms_norm(q, attn["q_norm"]["weight"], c.rms_norm_eps)
            k = nn.rms_norm(k, attn["k_norm"]["weight"], c.rms_norm_eps)
        inv_freq = c.rope_parameters.inverse_frequencies(c.head_dim)
        return nn.rope(q, positions, inv_freq), nn.rope(k, positions, inv_freq), v

    def _finish_block(self, layer, h, attn):
        c = self.config
        attn = attn.reshape(*attn.shape[:2], -1)
        o_proj = layer["self_attn"]["o_proj"]
        h = nn.residual(h, attn, o_proj["weight"], o_proj.get("bias"))
        h = checkpoint_name(h, "residual")
        x = nn.rms_norm(h, layer["post_attention_layernorm"]["weight"], c.rms_norm_eps)
        mlp = layer["mlp"]
        gate, up = (
            checkpoint_name(nn.linear(x, mlp[name]["weight"], mlp[name].get("bias")), "mlp_hidden")
            for name in ("gate_proj", "up_proj")
        )
        act = nn.activation(c.hidden_act)
        down = mlp["down_proj"]
        return nn.residual(h, act(gate) * up, down["weight"], down.get("bias"))

    def _final_norm(self, params, h):
        return nn.rms_norm(h, params["model"]["norm"]["weight"], self.config.rms_norm_eps)

    def hf_shapes(self):
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        out_in = {
            "self_attn.q_proj": (q, d),
            "self_attn.k_proj": (kv, d),
            "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q),
            "mlp.gate_proj": (f, d),
            "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f),
        }
        layer = {f"{name}.weight": shape for name, shape in out_in.items()}
        biased = {"self_attn.o_proj": c.attention_bias and c.model_type != "qwen2"}
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            biased[name] = c.attention_bias
        for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            biased[name] = c.mlp_bias
        layer.update({f"{n}.bias": (out_in[n][0],) for n, has_bias in biased.items() if has_bias})
        layer["input_layernorm.weight"] = (d,)
        layer["post_attention_layernorm.weight"] = (d,)
        if c.qk_norm:
            layer["self_attn.q_norm.weight"] = (c.head_dim,)
            layer["self_attn.k_norm.weight"] = (c.head_dim,)
        globals_ = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
        if not c.tie_word_embeddings:
            globals_["lm_head.weight"] = (c.vocab_size, d)
        return globals_, layer

    def _hf_transposed(self, suffix):
        return suffix == "lm_head.weight" or (
            suffix.endswith("_proj.weight") and suffix[: -len(".weight")] in _LINEARS
        )
