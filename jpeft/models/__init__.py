"""jpeft's own JAX language models, loaded from Hugging Face checkpoints or GGUF files.

Example::

    model, params = jpeft.models.from_pretrained("path/to/SmolLM2-135M-Instruct")
    logits = model(params, input_ids, attention_mask=mask)   # [b, t, v]
"""

from __future__ import annotations

import json
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
    "model_class",
    "read_config",
    "save_pretrained",
    "to_hf_state_dict",
    "virtual_tokens",
]


def from_config(config: dict, **model_options: Any) -> DecoderLM:
    """The model for a transformers ``config.json`` dict.

    Raises:
      ValueError: an unsupported ``model_type`` or config option, named in the message.
    """
    model_type = config.get("model_type")
    config_cls, model_cls = _registered(model_type)
    return model_cls(config_cls.from_hf(config), **model_options)


def model_class(model_type: str) -> type[DecoderLM]:
    """The jpeft model class of a transformers ``model_type`` (``Llama`` for ``"qwen2"``).

    Raises:
      ValueError: an unsupported ``model_type``.
    """
    return _registered(model_type)[1]


def _registered(model_type: Any) -> tuple[type, type[DecoderLM]]:
    if model_type not in _REGISTRY:
        raise ValueError(
            f"unsupported model_type {model_type!r}; jpeft implements {sorted(_REGISTRY)}"
        )
    return _REGISTRY[model_type]


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
        a time, and each layer of a stacked one apart, as a ``[1, ...]`` stack
        (:func:`jpeft.models.hf_layout.read`; :func:`jpeft.qlora.from_pretrained`
        quantises this way).
      **model_options: model fields such as ``remat``.

    Returns:
      ``(model, params)``: the model (config in ``model.config``) and its parameter tree.

    Raises:
      CheckpointError: a missing, corrupt or mismatched checkpoint.
      ValueError: an unsupported model type or config option.
    """
    config, tensors = _read(Path(path))
    model = from_config(config, **model_options)
    params = model.from_hf_state_dict(tensors, dtype=dtype, source=str(path), transform=transform)
    return model, params


def read_config(path: str | os.PathLike) -> dict:
    """The transformers ``config.json`` dict of a model folder or of a GGUF file (from its
    metadata; no tensor is read)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[dict, dict]:
    """``(config dict, HF-named tensors)`` of a folder or GGUF file; GGUF tensors are lazy."""
    if not path.exists():
        raise checkpoints.CheckpointError(f"{path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        from jpeft.hf import gguf

        return gguf.read_gguf(path)
    if path.is_dir():
        return checkpoints.read_folder(path)
    raise checkpoints.CheckpointError(f"{path} is neither a model folder nor a .gguf file")


def save_pretrained(
    model: DecoderLM,
    params: dict,
    out: str | os.PathLike,
    *,
    config: dict,
    tokenizer: Any = None,
) -> dict[str, np.ndarray]:
    """Writes a plain (e.g. merged) parameter tree as a Hugging Face model folder.

    The folder holds ``config.json`` (`config`, the base model's, with the weights' dtype),
    ``model.safetensors`` and, when given, the tokenizer's files:
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads it.

    Args:
      model: the model of `params`.
      params: a tree without adapter nodes (see :func:`jpeft.lora.merge`).
      out: the folder to write; created if missing.
      config: the base model's config dict (:func:`read_config`).
      tokenizer: a transformers tokenizer to save beside the weights, or None.

    Returns:
      The HF-named arrays written.

    Raises:
      ValueError: `config` names no ``architectures`` (transformers could not load the
        folder).
    """
    if not config.get("architectures"):
        raise ValueError(
            "the base model's config names no 'architectures'; transformers could not load "
            "the folder written"
        )
    state = model.to_hf_state_dict(params)
    floating = sorted(
        {v.dtype.name for v in state.values() if v.dtype.kind == "f" or v.dtype.name == "bfloat16"}
    )
    config = {k: v for k, v in config.items() if k != "torch_dtype"}
    if len(floating) == 1:
        config["dtype"] = floating[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    checkpoints.write_safetensors(state, out / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return state


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
