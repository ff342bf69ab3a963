"""Read a llama.cpp GGUF file into a Hugging Face config dict and an HF-named float32 state dict.

Layout facts this module relies on (checked against llama.cpp's ``convert_hf_to_gguf.py`` and the
GGUF loader of transformers, ``modeling_gguf_pytorch_utils.py``, which is the reference):

* ggml lists dimensions fastest-first, so a tensor's ``shape`` in the file is the reverse of the
  numpy/torch shape: an ``nn.Linear`` weight ``[out, in]`` is stored as ``[in, out]``.
  ``gguf.quants.dequantize`` already returns numpy order; we reshape to ``reversed(shape)`` so that
  1-D and quantised tensors come out the same way.
* For llama-architecture files the converter permutes the rows of ``attn_q``/``attn_k`` (weight and
  bias) per head, from HF's rotate-half RoPE layout to ggml's interleaved one; we undo it exactly as
  transformers does. Qwen2/Qwen3 files use ggml's NeoX RoPE and are stored unpermuted.
* GPT-2 ``Conv1D`` weights are ``[in, out]`` in HF; the converter transposes them to ``[out, in]``
  (it also writes ``output.weight`` as a copy of the token embedding), so we transpose them back.
* ``output.weight`` is written only when the LM head is not the embedding matrix, hence
  ``tie_word_embeddings`` is its absence.
* Llama 3 RoPE scaling is not stored as metadata but as a ``rope_freqs.weight`` tensor of
  per-frequency divisors; we turn it back into a ``"llama3"`` ``rope_parameters`` entry.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from jpeft.hf.checkpoints import CheckpointError

_DECODER_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_DECODER_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QWEN3_BLOCK = _DECODER_BLOCK | {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GPT2_GLOBAL = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
# architecture -> (HF class, global tensor names, per-block tensor names, HF block prefix)
_ARCHS = {
    "llama": ("LlamaForCausalLM", _DECODER_GLOBAL, _DECODER_BLOCK, "model.layers"),
    "qwen2": ("Qwen2ForCausalLM", _DECODER_GLOBAL, _DECODER_BLOCK, "model.layers"),
    "qwen3": ("Qwen3ForCausalLM", _DECODER_GLOBAL, _QWEN3_BLOCK, "model.layers"),
    "gpt2": ("GPT2LMHeadModel", _GPT2_GLOBAL, _GPT2_BLOCK, "transformer.h"),
}
_GPT2_TRANSPOSED = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
_ROPE_FREQS = "rope_freqs.weight"
_REQUIRED = object()  # `metadata_value` default: the key must be present
_TENSOR_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a GGUF file into a Hugging Face style config dict and HF-named state dict.

    The config carries the ``config.json`` keys transformers 5 would write for the equivalent model;
    the state dict maps HF parameter names to float32 arrays in HF layout, dequantised when first
    read (``np.asarray(state[name])``; ``.shape`` and ``.dtype`` need no work), so that a
    loader holds one tensor's float32 copy at a time rather than the whole model's. A tied LM
    head (``tie_word_embeddings``) has no ``lm_head.weight`` entry. Supports the ``llama``,
    ``qwen2``, ``qwen3`` and ``gpt2`` architectures.

    Raises:
        CheckpointError: (a ``ValueError``) if the file is missing, not GGUF, truncated or
            corrupt, of an unsupported architecture, or holds a tensor that cannot be
            dequantised or has no HF counterpart; the message starts with the path.
    """
    reader = open_reader(path)
    try:
        return _read(reader)
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _read(reader: GGUFReader) -> tuple[dict, dict[str, np.ndarray]]:
    """``read_gguf`` on an opened file."""
    arch = metadata_value(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCHS)}")
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = _dequantize(tensors[_ROPE_FREQS]) if _ROPE_FREQS in tensors else None
    config = _config(reader, arch, tensors, rope_freqs)
    state = {}
    for name, tensor in tensors.items():
        if name != _ROPE_FREQS:  # folded into config["rope_parameters"]
            hf_name, kind = _hf_name(arch, name)
            _check_supported(tensor)
            state[hf_name] = _LazyTensor(tensor, arch, kind, config)
    return config, state


class _LazyTensor:
    """A GGUF tensor in HF layout, dequantised to float32 each time numpy asks for it."""

    dtype = np.dtype(np.float32)

    def __init__(self, tensor, arch: str, kind: str, config: dict):
        self._tensor, self._arch, self._kind, self._config = tensor, arch, kind, config
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        self.shape = shape[::-1] if _gpt2_transposed(arch, kind, len(shape)) else shape
        self.ndim = len(shape)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = _to_hf_layout(self._arch, self._kind, _dequantize(self._tensor), self._config)
        return values if dtype is None else values.astype(dtype, copy=False)


def read_metadata(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[list[int], str]]]:
    """A GGUF file's metadata (key to Python value; arrays as lists) and each tensor's
    ``(shape, type)`` with the shape in numpy order and the type as GGUF names it (``"Q8_0"``).
    Reads no tensor data.

    Raises:
        CheckpointError: (a ``ValueError``) if the file is missing, not GGUF, truncated or
            corrupt.
    """
    reader = open_reader(path)
    metadata = {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }
    tensors = {
        t.name: ([int(n) for n in reversed(t.shape.tolist())], t.tensor_type.name)
        for t in reader.tensors
    }
    return metadata, tensors


class _Reader(GGUFReader):
    """:class:`gguf.GGUFReader` over a plain ndarray view of the file's memory map.

    The reader parses the header in one small slice of its ``data`` per number and string
    (about 800,000 for SmolLM2's 49,152-token vocabulary and merges), and slicing an
    ``np.memmap`` runs ``memmap.__array_finalize__`` each time: 2.0 s to open SmolLM2's
    GGUF against 0.7 s over the plain view (2-core AMD EPYC Zen 4), the same fields and
    tensors. The view reads the same mapped bytes."""

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple:
        """gguf's parts of a field; an array of strings or numbers (a vocabulary, its
        merges, token types and scores) in one pass that makes one or two views per item and
        nothing else, the same parts, indices and types as gguf's general path, which makes
        about ten numpy and enum objects per item (0.5 of the 0.7 s to open SmolLM2's
        file)."""
        if raw_type != _ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        parts: list[np.ndarray] = [item_type, count]
        offs, n = orig_offs + 12, int(count[0])
        if item_type[0] == _STRING:
            data, raw = self.data, memoryview(self.data)
            for _ in range(n):
                length = int.from_bytes(raw[offs : offs + 8], sys.byteorder)
                if offs + 8 + length > len(data):
                    raise ValueError(f"a string at byte {offs} runs past the end of the file")
                parts += (data[offs : offs + 8].view(np.uint64), data[offs + 8 : offs + 8 + length])
                offs += 8 + length
            indices = list(range(3, len(parts), 2))
        elif int(item_type[0]) in _NUMBERS:
            values = self._get(offs, _NUMBERS[int(item_type[0])], n)
            if len(values) != n:
                raise ValueError(f"an array at byte {offs} runs past the end of the file")
            parts += (values[i : i + 1] for i in range(n))
            offs += int(values.nbytes)
            indices = list(range(2, len(parts)))
        else:  # arrays of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        types = [GGUFValueType.ARRAY] + ([GGUFValueType(int(item_type[0]))] if n else [])
        return offs - orig_offs, parts, indices, types


_ARRAY, _STRING = int(GGUFValueType.ARRAY), int(GGUFValueType.STRING)
_NUMBERS = {int(kind): dtype for kind, dtype in GGUFReader.gguf_scalar_to_np.items()}


def open_reader(path: str | os.PathLike) -> GGUFReader:
    """Open and parse ``path``, turning I/O and parse failures into a
    :class:`CheckpointError` naming it.

    GGUF has no checksum; beyond what the reader parses, this checks that every tensor's
    data is aligned as the file declares, lies inside the file and overlaps no other
    tensor's, so that a damaged offset or shape cannot make a tensor read another's bytes.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open GGUF file: {e}") from e
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = _Reader(path)
        _check_tensor_layout(reader, size)
    except (OSError, ValueError, IndexError, KeyError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file: {e}") from e
    return reader


def _check_tensor_layout(reader: GGUFReader, size: int) -> None:
    """Raises ValueError unless the tensors' byte ranges are aligned, disjoint and in the
    file."""
    end = reader.data_offset
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        name, begin = tensor.name, int(tensor.data_offset)
        if (begin - reader.data_offset) % reader.alignment:
            raise ValueError(f"tensor {name!r} is not aligned to {reader.alignment} bytes")
        if begin < end:
            raise ValueError(f"tensor {name!r} overlaps the data of another tensor")
        end = begin + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != tensor.n_bytes:
            raise ValueError(f"tensor {name!r} ends at byte {end}, past the end of the file")


def metadata_value(reader: GGUFReader, key: str, default=_REQUIRED):
    """The metadata value under ``key`` as a Python scalar or string, else ``default``."""
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is _REQUIRED:
        raise ValueError(f"GGUF metadata key {key!r} is missing")
    return default


def _check_supported(tensor) -> None:
    if tensor.tensor_type.name not in _supported_types():
        raise ValueError(
            f"tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, which gguf cannot "
            f"dequantize; supported types: {_supported_types()}"
        )


_DEQUANTIZE_ROWS = 256
"""Rows dequantised at a time, as one call: ``gguf.quants.dequantize`` holds several
float32-sized temporaries (hundreds of MB for a whole embedding table), and cuts what it is
given into groups of 16 rows, each some 15 numpy calls; one flat row of 256 rows is 1.7x
faster (all of SmolLM2's tensors: 0.46 -> 0.27 s, 2-core AMD EPYC Zen 4), the same values."""


def _dequantize(tensor) -> np.ndarray:
    """Dequantise a reader tensor to a float32 array in numpy (HF) dimension order, a block
    of leading rows at a time."""
    shape = tuple(reversed(tensor.shape.tolist()))
    data = tensor.data  # memory-mapped; leading axis = leading axis of `shape`
    if data.ndim < 2:  # a copy: a float32 tensor's values are a view of the memory map, and
        # JAX may adopt such an array's memory, which kept the whole file mapped and resident
        return np.array(dequantize(data, tensor.tensor_type), np.float32).reshape(shape)
    out = np.empty((data.shape[0], math.prod(shape) // data.shape[0]), np.float32)
    for start in range(0, data.shape[0], _DEQUANTIZE_ROWS):
        rows = out[start : start + _DEQUANTIZE_ROWS]
        block = data[start : start + _DEQUANTIZE_ROWS].reshape(1, -1)
        rows[...] = dequantize(block, tensor.tensor_type).reshape(rows.shape)
    return out.reshape(shape)


@functools.cache
def _supported_types() -> list[str]:
    """Names of the GGML types ``gguf.quants.dequantize`` handles, probed on one zero block."""
    supported = []
    for qtype in GGMLQuantizationType:
        try:
            dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        supported.append(qtype.name)
    return supported


def _hf_name(arch: str, name: str) -> tuple[str, str]:
    """``(HF parameter name, GGUF tensor kind)`` for GGUF tensor ``name``, e.g. ``attn_q``."""
    _, global_names, block_names, prefix = _ARCHS[arch]
    match = _TENSOR_NAME.fullmatch(name)
    block, kind, suffix = match.groups() if match else (None, None, None)
    table = global_names if block is None else block_names
    if kind not in table:
        raise ValueError(f"GGUF tensor {name!r} has no Hugging Face counterpart in a {arch} model")
    hf = table[kind] if block is None else f"{prefix}.{block}.{table[kind]}"
    return f"{hf}.{suffix}", kind


def _to_hf_layout(arch: str, kind: str, values: np.ndarray, config: dict) -> np.ndarray:
    """Undo the converter's llama q/k row permutation and GPT-2 Conv1D transpose."""
    if arch == "llama" and kind in ("attn_q", "attn_k"):
        heads = config["num_attention_heads" if kind == "attn_q" else "num_key_value_heads"]
        shape = values.shape  # rows per head: (half, 2) interleaved in the file, (2, half) in HF
        values = values.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2)
        values = values.reshape(shape)
    elif _gpt2_transposed(arch, kind, values.ndim):
        values = values.T
    return np.ascontiguousarray(values)


def _gpt2_transposed(arch: str, kind: str, ndim: int) -> bool:
    """Whether the file stores this tensor transposed from HF's layout (GPT-2's Conv1D)."""
    return arch == "gpt2" and kind in _GPT2_TRANSPOSED and ndim == 2


def _config(reader: GGUFReader, arch: str, tensors: dict, rope_freqs: np.ndarray | None) -> dict:
    """The HF config dict for a file of architecture ``arch``."""

    def key(name: str, default=_REQUIRED):
        return metadata_value(reader, f"{arch}.{name}", default)

    if "token_embd.weight" not in tensors:
        raise ValueError("the file has no token_embd.weight tensor")
    common = {
        "model_type": arch,
        "architectures": [_ARCHS[arch][0]],
        # `{arch}.vocab_size` is optional; the embedding's row count is what the model must have
        "vocab_size": key("vocab_size", int(tensors["token_embd.weight"].shape[-1])),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata_value(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": metadata_value(reader, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": metadata_value(reader, "tokenizer.ggml.padding_token_id", None),
    }
    if arch == "gpt2":
        return common | {
            "n_embd": key("embedding_length"),
            "n_layer": key("block_count"),
            "n_head": key("attention.head_count"),
            "n_positions": key("context_length"),
            "n_inner": key("feed_forward_length"),
            "layer_norm_epsilon": float(key("attention.layer_norm_epsilon")),
            "activation_function": "gelu_new",
        }
    heads = key("attention.head_count")
    config = common | {
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_parameters": _rope_parameters(reader, arch, rope_freqs),
    }
    # transformers takes a llama head_dim from the rotary width; qwen files state it as key_length
    head_dim = key("attention.key_length", None)
    if arch == "llama":
        head_dim = key("rope.dimension_count", head_dim)
    if head_dim is not None:
        config["head_dim"] = head_dim
    # Qwen2 always has q/k/v biases; llama and qwen3 have them only when the config says so
    if arch != "qwen2" and any(re.fullmatch(r"blk\.\d+\.attn_\w+\.bias", n) for n in tensors):
        config["attention_bias"] = True
    return config


def _rope_parameters(reader: GGUFReader, arch: str, rope_freqs: np.ndarray | None) -> dict:
    """HF ``rope_parameters`` from the ``{arch}.rope.*`` keys and the ``rope_freqs`` tensor."""

    def key(name: str, default=_REQUIRED):
        return metadata_value(reader, f"{arch}.rope.{name}", default)

    # llama.cpp's runtime default when the converter wrote no base, as for HF configs without one
    params = {"rope_type": "default", "rope_theta": float(key("freq_base", 10000.0))}
    scaling = key("scaling.type", "none")
    if scaling == "none":
        if rope_freqs is not None:
            params |= _llama3_rope(rope_freqs, params["rope_theta"])
        return params
    if scaling != "linear":
        # jpeft's rotary embedding implements default, linear and llama3 scaling (YaRN not)
        raise ValueError(
            f"GGUF rope scaling type {scaling!r} is not supported; jpeft reads 'none' (with "
            "Llama 3's rope_freqs) and 'linear'"
        )
    return params | {"rope_type": "linear", "factor": float(key("scaling.factor"))}


def _llama3_rope(divisors: np.ndarray, theta: float) -> dict:
    """Llama 3 rope parameters from llama.cpp's ``rope_freqs`` divisors.

    The converter computes them from ``factor``, ``low_freq_factor``, ``high_freq_factor`` and an
    ``original_max_position_embeddings`` it fixes at 8192, and the file keeps none of these (only
    their ratios are recoverable). ``factor`` is the largest divisor; the rest are Meta's values
    (1, 4, 8192), checked by recomputing the tensor from them.
    """
    factor, low, high, original = float(divisors.max()), 1.0, 4.0, 8192
    dim = 2 * divisors.size
    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2) / dim)
    smooth = (original / wavelen - low) / (high - low)
    expected = np.where(wavelen < original / high, 1.0, 1 / ((1 - smooth) / factor + smooth))
    expected = np.where(wavelen > original / low, factor, expected)
    if not np.allclose(divisors, expected, rtol=1e-4):
        raise ValueError(
            f"{_ROPE_FREQS} does not match llama3 rope scaling with factor {factor}, "
            f"low_freq_factor {low}, high_freq_factor {high} and "
            f"original_max_position_embeddings {original}"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
