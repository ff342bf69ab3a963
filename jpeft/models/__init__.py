"""jpeft's own JAX language models, loaded from Hugging Face checkpoints or GGUF files.

Example::

    model, params = jpeft.models.from_pretrained("path/to/SmolLM2-135M-Instruct")
    logits = model(params, input_ids, attention_mask=mask)   # [b, t, v]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.hf import checkpoints
from jpeft.models import decoder, gpt2, llama, virtual_tokens
from jpeft.models.decoder import DecoderLM, KVCache
from jpeft.models.virtual_tokens import KVPrefix

_REGISTRY = {
    **{name: (llama.LlamaConfig, llama.Llama) for name in llama.MODEL_TYPES},
    **{name: (gpt2.GPT2Config, gpt2.GPT2) for name in gpt2.MODEL_TYPES},
}

__all__ = [
    "DecoderLM",
    "KVCache",
    "KVPrefix",
    "decoder",
    "from_config",
    "from_pretrained",
    "gpt2",
    "llama",
    "load_tokenizer",
    "to_hf_state_dict",
    "virtual_tokens",
]


def from_config(config: dict, **model_options: Any) -> DecoderLM:
    """The model for a transformers ``config.json`` dict.

    Raises:
      ValueError: an unsupported ``model_type`` or config option, named in the message.
    """
    model_type = config.get("model_type")
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported model_type {model_type!r}; jpeft implements {sorted(_REGISTRY)}"
        )
    config_cls, model_cls = _REGISTRY[model_type]
    return model_cls(config_cls.from_hf(config), **model_options)


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    transform: Callable[[tuple[str, ...], jax.Array], Any] | None = None,
    **model_options: Any,
) -> tuple[DecoderLM, dict]:
    """Loads a model and its parameters from a local Hugging Face folder or a GGUF file.

    Args:
      path: a folder with ``config.json`` and ``*.safetensors`` (sharded with
        ``model.safetensors.index.json`` too), or a ``.gguf`` file (dequantised).
      dtype: the floating dtype of the parameters (e.g. ``jnp.bfloat16`` for a frozen base).
      transform: ``transform(path, array)`` replaces each parameter as it is loaded, one at
        a time (see :func:`jpeft.qlora.from_pretrained`, which quantises this way).
      **model_options: model fields such as ``remat``.

    Returns:
      ``(model, params)``: the model (config in ``model.config``) and its parameter tree.

    Raises:
      CheckpointError: a missing, corrupt or mismatched checkpoint.
      ValueError: an unsupported model type or config option.
    """
    path = Path(path)
    if not path.exists():
        raise checkpoints.CheckpointError(f"{path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        from jpeft.hf import gguf

        config, tensors = gguf.read_gguf(path)
    elif path.is_dir():
        config, tensors = checkpoints.read_folder(path)
    else:
        raise checkpoints.CheckpointError(f"{path} is neither a model folder nor a .gguf file")
    model = from_config(config, **model_options)
    params = model.from_hf_state_dict(tensors, dtype=dtype, source=str(path), transform=transform)
    return model, params


def load_tokenizer(path: str | os.PathLike):
    """The transformers tokenizer of a local model folder or of a GGUF file (its embedded
    vocabulary and chat template), with left padding for batched generation.

    A GGUF tokenizer is built by :func:`jpeft.hf.gguf_tokenizer.read_tokenizer` (transformers'
    own GGUF reader needs torch); a folder's by ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from jpeft.hf import gguf_tokenizer

        try:
            tokenizer = gguf_tokenizer.read_tokenizer(path)
        except ValueError as err:
            raise checkpoints.CheckpointError(str(err)) from err
    elif path.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise checkpoints.CheckpointError(f"{path} is neither a model folder nor a .gguf file")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def to_hf_state_dict(model: DecoderLM, params: dict) -> dict[str, np.ndarray]:
    """HF-named, HF-layout numpy arrays of a plain (merged) parameter tree."""
    return model.to_hf_state_dict(params)
