"""Damaged files, tried for real: a model's safetensors file, a GGUF file, a jpeft (Orbax)
adapter folder and a PEFT ``adapter_model.safetensors``, each truncated at random lengths
and hit by single-bit flips at random offsets (seeded, `CASES` cases a format).

Every case must end in jpeft's own error, a :class:`jpeft.CheckpointError` whose message
names the damaged file (or its folder), or load exactly what was saved: never another
exception, a hang or a different model loaded silently.

Where the format itself cannot tell a damaged value from a valid one, flips are kept out of
it, and the test says so: safetensors and GGUF carry no checksum, so a flipped bit in the
tensor data of a file written by transformers or llama.cpp, or in a GGUF number such as
``rope_freq_base``, is another valid number. Files jpeft writes carry digests (the PEFT
export's tensors, every array of a jpeft adapter), so in those every byte is fair game.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import signal
import threading

import gguf
import hf_models
import jax
import numpy as np
import pytest
import torch
import transformers
from test_gguf import _TINY, _convert  # llama.cpp's converter, re-implemented for the tests

import jpeft
from jpeft import checkpoint, lora, tree

CASES = 60  # per format, half truncations and half bit flips
CASE_SECONDS = 60  # a load that takes longer counts as a hang (a good one takes < 1 s)


@contextlib.contextmanager
def _time_limit(case: str):
    """Fails the test if the block runs past CASE_SECONDS (SIGALRM: main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hang(signum, frame):
        pytest.fail(f"{case}: still loading after {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _damage(data: bytes, case: int, rng: random.Random, flip_offsets) -> tuple[str, bytes]:
    """Case `case` of `data`: even cases truncate anywhere, odd ones flip one bit at one of
    `flip_offsets`."""
    if case % 2 == 0:
        size = rng.randrange(len(data))
        return f"truncated to {size} of {len(data)} bytes", data[:size]
    offset, bit = rng.choice(flip_offsets), rng.randrange(8)
    damaged = bytearray(data)
    damaged[offset] ^= 1 << bit
    return f"bit {bit} of byte {offset} flipped", bytes(damaged)


def _try(case: str, named: str, load, equal) -> str:
    """'refused' or 'loaded' for one damaged file; fails on anything else."""
    try:
        with _time_limit(case):
            loaded = load()
    except jpeft.CheckpointError as err:
        assert named in str(err), f"{case}: the error does not name {named}: {err}"
        return "refused"
    except Exception as err:
        pytest.fail(f"{case}: {type(err).__name__} instead of a CheckpointError: {err}")
    assert equal(loaded), f"{case}: loaded something other than what was saved, silently"
    return "loaded"


def _same_leaves(a, b) -> bool:
    leaves_a, def_a = jax.tree.flatten(a)
    leaves_b, def_b = jax.tree.flatten(b)
    return def_a == def_b and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def _fuzz(path, good: bytes, flip_offsets, load, equal, named: str, seed: int) -> dict:
    """Runs CASES damaged versions of the file at `path`, restoring it after each one."""
    rng = random.Random(seed)
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(CASES):
        label, damaged = _damage(good, i, rng, flip_offsets)
        path.write_bytes(damaged)
        try:
            outcomes[_try(f"{path.name} {label}", named, load, equal)] += 1
        finally:
            path.write_bytes(good)
    return outcomes


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt") / "llama"
    hf_models.make("llama", folder)
    return folder, *jpeft.models.from_pretrained(folder)


@pytest.fixture(scope="module")
def adapted(tiny_llama):
    """A LoRA adapter with random (non-zero) factors on q and v."""
    _, _, base = tiny_llama
    return lora.apply(
        base, rank=4, targets=["q_proj", "v_proj"], key=jax.random.key(0), init_lora_weights=False
    )


def test_damaged_model_safetensors(tiny_llama):
    folder, model, base = tiny_llama
    path = folder / "model.safetensors"
    good = path.read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")  # flips: length and JSON header

    def equal(loaded):
        return loaded[0].config == model.config and _same_leaves(loaded[1], base)

    outcomes = _fuzz(
        path, good, range(header_end), lambda: jpeft.models.from_pretrained(folder), equal,
        named=str(path), seed=1,
    )  # fmt: skip
    assert outcomes["refused"] >= CASES // 2, outcomes  # every truncation at least


def _gguf_number_bytes(path) -> set[int]:
    """The offsets of the values of a GGUF file's numeric metadata keys."""
    reader = gguf.GGUFReader(path)
    start = reader.data.__array_interface__["data"][0]
    numbers = set(gguf.GGUFValueType) - {gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY}
    offsets = set()
    for field in reader.fields.values():
        if len(field.types) == 1 and field.types[0] in numbers:
            value = field.parts[field.data[0]]
            begin = value.__array_interface__["data"][0] - start
            offsets.update(range(begin, begin + value.nbytes))
    return offsets


def test_damaged_gguf_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.gguf"
    _convert(transformers.AutoModelForCausalLM.from_config(_TINY["llama"]), "llama", path)
    model, base = jpeft.models.from_pretrained(path)
    good = path.read_bytes()
    # Flips: the header, keys, types, lengths, strings and tensor descriptions (names,
    # shapes, types, offsets), but neither tensor data nor numeric metadata values.
    numbers = _gguf_number_bytes(path)
    flips = [i for i in range(gguf.GGUFReader(path).data_offset) if i not in numbers]
    # A damaged name of an optional key (a special token id) reads as a file without it.
    tokens = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"))

    def equal(loaded):
        config = dataclasses.replace(loaded[0].config, **tokens)
        return config == dataclasses.replace(model.config, **tokens) and _same_leaves(
            loaded[1], base
        )

    outcomes = _fuzz(
        path, good, flips, lambda: jpeft.models.from_pretrained(path), equal, named=str(path),
        seed=2,
    )  # fmt: skip
    assert outcomes["refused"] >= CASES // 2, outcomes


def test_gguf_tensor_offsets_pointing_at_other_bytes_are_refused(tmp_path):
    """A flipped bit in a tensor's data offset keeps the file parseable; without jpeft's
    layout check the tensor would silently read another tensor's bytes (or padding)."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.gguf"
    _convert(transformers.AutoModelForCausalLM.from_config(_TINY["llama"]), "llama", path)
    good = path.read_bytes()
    reader = gguf.GGUFReader(path)
    start = reader.data.__array_interface__["data"][0]
    for tensor in reader.tensors:
        offset_field = tensor.field.parts[-1]  # uint64, relative to the data section
        at = offset_field.__array_interface__["data"][0] - start
        for bit in (5, 6, 7, 9, 12):  # multiples of the 32-byte alignment, then one not
            damaged = bytearray(good)
            damaged[at + bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(bytes(damaged))
            with pytest.raises(jpeft.CheckpointError, match="truncated or corrupt") as info:
                jpeft.models.from_pretrained(path)
            assert str(path) in str(info.value), (tensor.name, bit)
    path.write_bytes(good)
    jpeft.models.from_pretrained(path)  # the intact file loads


@pytest.mark.filterwarnings(
    # Orbax leaves coroutines of a failed restore to be collected after its event loop closed.
    "ignore::pytest.PytestUnraisableExceptionWarning"
)
def test_damaged_jpeft_adapter_folder(tiny_llama, adapted, tmp_path):
    _, _, base = tiny_llama
    folder = tmp_path / "adapter"
    checkpoint.save_adapter(adapted, folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.stat().st_size)
    assert len(files) > 5  # the JSON file and Orbax's own files
    saved = tree.extract(adapted)

    def load():
        return checkpoint.load_adapter(base, folder)

    def equal(loaded):
        return _same_leaves(tree.extract(loaded), saved)

    rng = random.Random(3)
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(CASES):  # each case damages one file of the folder
        path = files[rng.randrange(len(files))]
        good = path.read_bytes()
        label, damaged = _damage(good, i, rng, range(len(good)))
        path.write_bytes(damaged)
        try:
            case = f"{path.relative_to(folder)} {label}"
            outcomes[_try(case, str(folder), load, equal)] += 1
        finally:
            path.write_bytes(good)
    assert outcomes["refused"] > 0, outcomes
    assert equal(load())  # and the restored folder loads as saved


def test_damaged_peft_adapter_model_safetensors(tiny_llama, adapted, tmp_path):
    _, _, base = tiny_llama
    folder = jpeft.hf.export_peft(adapted, tmp_path / "hf")
    path = folder / "adapter_model.safetensors"
    good = path.read_bytes()
    saved = tree.extract(adapted)

    def equal(loaded):
        return _same_leaves(tree.extract(loaded), saved)

    outcomes = _fuzz(
        path, good, range(len(good)), lambda: jpeft.hf.import_peft(base, folder), equal,
        named=str(path), seed=4,
    )  # fmt: skip
    assert outcomes["refused"] >= CASES // 2, outcomes


def test_adapter_arrays_of_another_save_are_refused(tiny_llama, adapted, tmp_path):
    """Arrays of the right names, shapes and dtypes but other values (another save's folder
    put in place, say) are caught by the digests of the JSON file."""
    _, _, base = tiny_llama
    checkpoint.save_adapter(adapted, tmp_path / "a")
    other = jax.tree.map(lambda x: x + 1 if isinstance(x, jax.Array) else x, adapted)
    checkpoint.save_adapter(other, tmp_path / "b")
    (arrays_a,) = (tmp_path / "a").glob("jpeft_arrays_*")
    (arrays_b,) = (tmp_path / "b").glob("jpeft_arrays_*")
    shutil.rmtree(arrays_a)
    shutil.copytree(arrays_b, arrays_a)
    with pytest.raises(jpeft.CheckpointError, match="differs from the digest") as info:
        checkpoint.load_adapter(base, tmp_path / "a")
    assert str(arrays_a) in str(info.value)
