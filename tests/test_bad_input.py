"""Bad checkpoints, configs and calls fail early with jpeft's own, explicit errors.

Each test checks the exception type, that the message names the problem, and that the
exception was raised by jpeft's code (its innermost frame is in the ``jpeft`` package), not
from deep inside JAX, numpy or a file reader.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import hf_models
import jax.numpy as jnp
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jpeft

JPEFT_DIR = Path(jpeft.__file__).resolve().parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(kind)``: the folder of a tiny random model of `kind`, made once."""
    folders: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in folders:
            folders[kind] = tmp_path_factory.mktemp(kind)
            hf_models.make(kind, folders[kind])
        return folders[kind]

    return get


@pytest.fixture
def llama(saved, tmp_path) -> Path:
    """A fresh copy of a good tiny Llama folder, to be damaged by the test."""
    folder = tmp_path / "llama"
    shutil.copytree(saved("llama"), folder)
    return folder


def _raised_by_jpeft(excinfo) -> None:
    where = Path(str(excinfo.traceback[-1].path)).resolve()
    assert JPEFT_DIR in where.parents, f"raised from {where}, not from jpeft"


def _load_fails(path, exc, match):
    with pytest.raises(exc, match=match) as excinfo:
        jpeft.models.from_pretrained(path)
    _raised_by_jpeft(excinfo)
    return excinfo


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ----------------------------------------------------------------------------- files


def test_folder_without_config_json(llama):
    (llama / "config.json").unlink()
    _load_fails(llama, jpeft.CheckpointError, r"config\.json")


def test_config_json_that_is_not_json(llama):
    (llama / "config.json").write_text("{not json")
    _load_fails(llama, jpeft.CheckpointError, r"config\.json is not valid JSON")


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-model"
    _load_fails(missing, jpeft.CheckpointError, rf"{re.escape(str(missing))} does not exist")


def test_folder_without_safetensors(llama):
    (llama / "model.safetensors").unlink()
    _load_fails(llama, jpeft.CheckpointError, r"no \*\.safetensors weights")


def test_folder_with_only_pytorch_model_bin(llama):
    torch.save({name: torch.tensor(a) for name, a in load_file(llama / "model.safetensors").items()},
               llama / "pytorch_model.bin")
    (llama / "model.safetensors").unlink()
    _load_fails(llama, jpeft.CheckpointError, r"\*\.safetensors.*pytorch_model\.bin")


def test_truncated_safetensors(llama):
    file = llama / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _load_fails(llama, jpeft.CheckpointError, r"model\.safetensors is truncated")


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize(
    "damage",
    [
        # 8 garbage bytes: a header length far beyond the file
        lambda data: b"\xde\xad\xbe\xef" * 2 + data[8:],
        # the right length, but the header is binary garbage (not UTF-8)
        lambda data: data[:8] + b"\xff" * _header_len(data) + data[8 + _header_len(data) :],
        # the right length, but the header is text that is not JSON
        lambda data: data[:8] + b"x" * _header_len(data) + data[8 + _header_len(data) :],
        # valid JSON that is not an object
        lambda data: struct.pack("<Q", 9) + b"[1, 2, 3]",
        # an object whose entries are not tensor descriptions
        lambda data: struct.pack("<Q", 10) + b'{"a": "x"}',
        # a tensor whose data offsets point back into the header
        lambda data: _one_tensor_file(b'{"a": {"dtype": "F32", "shape": [1], '
                                      b'"data_offsets": [-4, 0]}}'),
        # an unknown dtype
        lambda data: _one_tensor_file(b'{"a": {"dtype": "F4", "shape": [2], '
                                      b'"data_offsets": [0, 1]}}'),
    ],
    ids=["huge-length", "binary-header", "text-header", "json-list", "bad-entry",
         "negative-offset", "unknown-dtype"],
)
def test_garbage_safetensors_header(llama, damage):
    file = llama / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    _load_fails(llama, jpeft.CheckpointError, r"model\.safetensors")


def _one_tensor_file(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


def test_index_naming_a_missing_shard(saved, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(saved("llama"), folder)
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00009-of-00009.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _load_fails(folder, jpeft.CheckpointError, r"model-00009-of-00009\.safetensors")


# ----------------------------------------------------------------------------- configs


def test_unknown_model_type(llama):
    _edit_config(llama, model_type="falcon")
    excinfo = _load_fails(llama, ValueError, r"unsupported model_type 'falcon'")
    assert not isinstance(excinfo.value, jpeft.CheckpointError)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
         "original_max_position_embeddings": 32},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ],
    ids=lambda rope: rope["rope_type"],
)
def test_unsupported_rope_type(llama, rope):
    _edit_config(llama, rope_parameters=rope)
    _load_fails(llama, ValueError, rf"unsupported rope_type '{rope['rope_type']}'")


def test_old_style_rope_scaling_is_checked_too(llama):
    config = json.loads((llama / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 10000.0
    config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (llama / "config.json").write_text(json.dumps(config))
    _load_fails(llama, ValueError, r"unsupported rope_type 'dynamic'")


def test_gpt2_scale_attn_by_inverse_layer_idx(saved, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(saved("gpt2"), folder)
    _edit_config(folder, scale_attn_by_inverse_layer_idx=True)
    _load_fails(folder, ValueError, r"scale_attn_by_inverse_layer_idx")


# ----------------------------------------------------------------------------- config vs weights


def test_hidden_size_disagrees_with_weights(llama):
    _edit_config(llama, hidden_size=64)  # head_dim stays 8 in config.json
    _load_fails(
        llama,
        jpeft.CheckpointError,
        r"tensor model\.embed_tokens\.weight .*has shape \(97, 32\), expected \(97, 64\)",
    )


def test_missing_layer_tensor(llama):
    file = llama / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    _load_fails(llama, jpeft.CheckpointError, r"missing model\.layers\.1\.mlp\.up_proj\.weight")


def test_unexpected_tensor(llama):
    file = llama / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    _load_fails(llama, jpeft.CheckpointError,
                r"missing none, unexpected model\.layers\.2\.mlp\.up_proj\.weight")


# ----------------------------------------------------------------------------- calls


def test_call_without_ids_or_embeds(saved):
    model, params = jpeft.models.from_pretrained(saved("llama"))
    with pytest.raises(ValueError, match=r"exactly one of input_ids and inputs_embeds") as e:
        model(params)
    _raised_by_jpeft(e)


def test_call_with_both_ids_and_embeds(saved):
    model, params = jpeft.models.from_pretrained(saved("llama"))
    ids = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"exactly one of input_ids and inputs_embeds") as e:
        model(params, ids, inputs_embeds=jnp.zeros((1, 3, 32)))
    _raised_by_jpeft(e)
