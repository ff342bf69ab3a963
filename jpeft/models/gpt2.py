"""GPT-2: learned positions, LayerNorm, GELU (tanh), fused qkv in ``Conv1D`` layout.

One pre-norm block per layer::

    h = h + c_proj(attention(split(c_attn(ln_1(h)))))
    h = h + mlp.c_proj(gelu_new(c_fc(ln_2(h))))

Hugging Face's ``Conv1D`` stores its weight ``[in, out]``, which is jpeft's linear layout,
so no weight is transposed on the way in or out. Hugging Face PEFT calls this layout
``fan_in_fan_out=True``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpeft import nn
from jpeft.models import decoder

MODEL_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """Architecture of a GPT-2 model, with transformers' field names."""

    model_type: str = "gpt2"
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) is not a multiple of n_head ({self.n_head})")
        nn.activation(self.activation_function)

    @classmethod
    def from_hf(cls, config: dict) -> GPT2Config:
        """From a transformers ``config.json`` dict; rejects options jpeft does not implement."""
        for option in (
            "scale_attn_by_inverse_layer_idx",
            "reorder_and_upcast_attn",
            "add_cross_attention",
        ):
            if config.get(option):
                raise ValueError(f"unsupported GPT-2 option {option}=True; expected False")
        return cls(
            vocab_size=config["vocab_size"],
            n_positions=config.get("n_positions", 1024),
            n_embd=config["n_embd"],
            n_layer=config["n_layer"],
            n_head=config["n_head"],
            n_inner=config.get("n_inner") or 4 * config["n_embd"],
            activation_function=config.get("activation_function", "gelu_new"),
            layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
            scale_attn_weights=config.get("scale_attn_weights", True),
            tie_word_embeddings=config.get("tie_word_embeddings", True),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=_hashable(config.get("eos_token_id")),
            pad_token_id=config.get("pad_token_id"),
        )


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class GPT2(decoder.DecoderLM):
    """GPT-2 over a parameter tree (see :class:`decoder.DecoderLM`)."""

    config: GPT2Config
    layers_path: ClassVar[tuple[str, ...]] = ("transformer", "h")
    embed_path: ClassVar[tuple[str, ...]] = ("transformer", "wte")
    attention_output_path: ClassVar[tuple[str, ...]] = ("attn", "c_proj")
    mlp_output_path: ClassVar[tuple[str, ...]] = ("mlp", "c_proj")
    _hf_ignored: ClassVar[tuple[str, ...]] = (r"\.attn\.bias$", r"\.attn\.masked_bias$")

    @property
    def num_layers(self) -> int:
        return self.config.n_layer

    @property
    def num_kv_heads(self) -> int:
        return self.config.n_head

    @property
    def head_dim(self) -> int:
        return self.config.n_embd // self.config.n_head

    @property
    def learned_positions(self) -> int:
        return self.config.n_positions

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5 if self.config.scale_attn_weights else 1.0

    def _embed(self, params, tokens, positions):
        t = params["transformer"]
        h = tokens if tokens.ndim == 3 else nn.embed(tokens, t["wte"]["weight"])
        return h + nn.embed(positions, t["wpe"]["weight"], dtype=h.dtype)

    def _qkv(self, layer, h, positions):
        c = self.config
        x = nn.layer_norm(h, layer["ln_1"]["weight"], layer["ln_1"]["bias"], c.layer_norm_epsilon)
        qkv = nn.linear(x, layer["attn"]["c_attn"]["weight"], layer["attn"]["c_attn"]["bias"])
        batch, steps = x.shape[:2]
        return tuple(
            part.reshape(batch, steps, c.n_head, self.head_dim)
            for part in jnp.split(qkv, 3, axis=-1)
        )

    def _finish_block(self, layer, h, attn):
        c = self.config
        proj = layer["attn"]["c_proj"]
        h = nn.residual(h, attn.reshape(*attn.shape[:2], -1), proj["weight"], proj["bias"])
        h = checkpoint_name(h, "residual")
        x = nn.layer_norm(h, layer["ln_2"]["weight"], layer["ln_2"]["bias"], c.layer_norm_epsilon)
        mlp = layer["mlp"]
        hidden = nn.linear(x, mlp["c_fc"]["weight"], mlp["c_fc"]["bias"])
        x = nn.activation(c.activation_function)(checkpoint_name(hidden, "mlp_hidden"))
        return nn.residual(h, x, mlp["c_proj"]["weight"], mlp["c_proj"]["bias"])

    def _final_norm(self, params, h):
        ln_f = params["transformer"]["ln_f"]
        return nn.layer_norm(h, ln_f["weight"], ln_f["bias"], self.config.layer_norm_epsilon)

    def hf_shapes(self):
        c = self.config
        d, f = c.n_embd, c.n_inner
        layer = {
            "ln_1.weight": (d,),
            "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d),
            "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d),
            "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,),
            "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, f),
            "mlp.c_fc.bias": (f,),
            "mlp.c_proj.weight": (f, d),
            "mlp.c_proj.bias": (d,),
        }
        globals_ = {
            "transformer.wte.weight": (c.vocab_size, d),
            "transformer.wpe.weight": (c.n_positions, d),
            "transformer.ln_f.weight": (d,),
            "transformer.ln_f.bias": (d,),
        }
        if not c.tie_word_embeddings:
            globals_["lm_head.weight"] = (c.vocab_size, d)
        return globals_, layer

    def _hf_transposed(self, suffix):
        # Conv1D weights are already [in, out]; only an untied Linear head is [out, in].
        return suffix == "lm_head.weight"
