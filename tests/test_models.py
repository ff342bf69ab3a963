"""jpeft's models against transformers: logits, KV cache, KV prefix, export, loading, jit.

Every model is a tiny random transformers model (tests/hf_models.py) saved to a temporary
folder and loaded back with :func:`jpeft.models.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

import jpeft
from jpeft import tree
from jpeft.models import hf_layout
from jpeft.generation import generate_tokens
from jpeft.models import KVPrefix

# jpeft (float32, 'highest' matmul precision from conftest) against torch float32: the
# observed difference is ~1e-7 on logits of magnitude ~0.5, so 1e-4 only allows for a
# different order of float32 operations, while a real error (a wrong rope, mask, bias,
# norm or position) moves these logits by 1e-3 or more.
HF_PARITY_ATOL = 1e-4

# jpeft against jpeft on the same float32 inputs through a different code path (KV cache,
# KV prefix, inputs_embeds): only the shapes of the reductions differ (observed ~1e-7).
SELF_ATOL = 1e-5

VOCAB = 97  # hf_models' vocabulary size


@dataclasses.dataclass
class Tiny:
    folder: object
    hf: object  # the torch model
    model: jpeft.models.DecoderLM
    params: dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``tiny(kind)``: a saved random model of `kind` and its jpeft load, made once."""
    made: dict[str, Tiny] = {}

    def get(kind: str) -> Tiny:
        if kind not in made:
            folder = tmp_path_factory.mktemp(kind)
            hf = hf_models.make(kind, folder)
            model, params = jpeft.models.from_pretrained(folder)
            made[kind] = Tiny(folder, hf, model, params)
        return made[kind]

    return get


@functools.partial(jax.jit, static_argnames="model")
def _forward(model, params, input_ids, attention_mask):
    return model(params, input_ids, attention_mask=attention_mask)


@functools.partial(jax.jit, static_argnames="model")
def _forward_embeds(model, params, inputs_embeds, attention_mask):
    return model(params, inputs_embeds=inputs_embeds, attention_mask=attention_mask)


@functools.partial(jax.jit, static_argnames="model")
def _forward_prefixed(model, params, input_ids, positions, kv_prefix):
    return model(params, input_ids, positions=positions, kv_prefix=kv_prefix)


@functools.partial(jax.jit, static_argnames="model")
def _cached_step(model, params, input_ids, attention_mask, cache):
    hidden, cache = model.hidden_states(
        params, input_ids, attention_mask=attention_mask, cache=cache
    )
    return model.logits(params, hidden), cache


# Most tests use this shape, so that the jitted full-sequence forward compiles once a model.
BATCH, STEPS = 2, 12


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def _left_padded_mask(batch, steps, pads):
    mask = np.ones((batch, steps), np.int32)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return mask


def _max_diff(a, b, where=None):
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float(diff[where].max() if where is not None else diff.max())


# ----------------------------------------------------------------------------- logit parity


@pytest.mark.parametrize("kind", sorted(hf_models.CONFIGS))
def test_logits_match_transformers_with_left_padding(tiny, kind):
    t = tiny(kind)
    ids = _ids((3, 13), seed=1)
    mask = _left_padded_mask(3, 13, pads=(0, 4, 1))
    ours = np.asarray(_forward(t.model, t.params, jnp.asarray(ids), jnp.asarray(mask)))
    theirs = hf_models.hf_logits(t.hf, ids.astype(np.int64), mask.astype(np.int64))
    assert ours.shape == theirs.shape == (3, 13, VOCAB)
    assert ours.dtype == np.float32
    real = mask.astype(bool)
    assert _max_diff(ours, theirs, real) <= HF_PARITY_ATOL
    # A padding query sees no valid key: its (ignored) logits must still be finite.
    assert np.isfinite(ours).all()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_inputs_embeds_equal_ids(tiny, kind):
    t = tiny(kind)
    ids = jnp.asarray(_ids((BATCH, STEPS), seed=2))
    mask = jnp.asarray(_left_padded_mask(BATCH, STEPS, pads=(0, 3)))
    table = t.model.embedding(t.params)
    embeds = jnp.take(table, ids, axis=0)
    from_ids = _forward(t.model, t.params, ids, mask)
    from_embeds = _forward_embeds(t.model, t.params, embeds, mask)
    assert from_embeds.shape == (BATCH, STEPS, VOCAB)
    assert _max_diff(from_ids, from_embeds) <= SELF_ATOL


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral", "gpt2"])
def test_kv_cache_decoding_equals_full_recomputation(tiny, kind):
    """Prefill a left-padded prompt, then decode one token at a time. Mistral's sliding
    window is 5, so the 12 tokens here go well past it."""
    t = tiny(kind)
    batch, prompt, new = BATCH, 7, STEPS - 7
    ids = jnp.asarray(_ids((batch, prompt + new), seed=3))
    mask = jnp.asarray(_left_padded_mask(batch, prompt + new, pads=(0, 3)))
    full = np.asarray(_forward(t.model, t.params, ids, mask))

    cache = t.model.init_cache(batch, prompt + new + 3)  # spare empty slots must be ignored
    logits, cache = _cached_step(t.model, t.params, ids[:, :prompt], mask[:, :prompt], cache)
    real = np.asarray(mask[:, :prompt]).astype(bool)
    assert _max_diff(logits, full[:, :prompt], real) <= SELF_ATOL
    assert int(cache.length) == prompt
    np.testing.assert_array_equal(cache.next_position, [7, 4])

    one = jnp.ones((batch, 1), jnp.int32)
    for step in range(prompt, prompt + new):
        logits, cache = _cached_step(t.model, t.params, ids[:, step : step + 1], one, cache)
        assert logits.shape == (batch, 1, VOCAB)
        assert _max_diff(logits[:, 0], full[:, step]) <= SELF_ATOL, f"step {step}"
    assert int(cache.length) == prompt + new
    np.testing.assert_array_equal(cache.next_position, [12, 9])


# ----------------------------------------------------------------------------- KV prefix


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2"])
def test_kv_prefix_of_a_real_prompt_equals_running_it(tiny, kind):
    """The keys and values of a real p-token prompt, given as a KVPrefix, make the model
    continue exactly as if the prompt were part of the input."""
    t = tiny(kind)
    batch, p, steps = BATCH, 5, STEPS - 5
    ids = jnp.asarray(_ids((batch, p + steps), seed=4))
    full = _forward(t.model, t.params, ids, jnp.ones_like(ids))

    cache = t.model.init_cache(batch, p)
    _, cache = _cached_step(t.model, t.params, ids[:, :p], jnp.ones_like(ids[:, :p]), cache)
    prefix = KVPrefix(cache.k[:, :, :p], cache.v[:, :, :p])
    assert prefix.k.shape == (t.model.num_layers, batch, p, t.model.num_kv_heads, t.model.head_dim)
    positions = p + jnp.broadcast_to(jnp.arange(steps), (batch, steps))
    got = _forward_prefixed(t.model, t.params, ids[:, p:], positions, prefix)
    assert got.shape == (batch, steps, VOCAB)
    assert _max_diff(got, full[:, p:]) <= SELF_ATOL
    # The check can fail: the other row's prompt as prefix gives other logits.
    swapped = KVPrefix(prefix.k[:, ::-1], prefix.v[:, ::-1])
    other = _forward_prefixed(t.model, t.params, ids[:, p:], positions, swapped)
    assert _max_diff(other, full[:, p:]) > 10 * SELF_ATOL


# ----------------------------------------------------------------------------- HF export


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_to_hf_state_dict_loads_in_transformers(tiny, kind, tmp_path):
    t = tiny(kind)
    exported = jpeft.models.to_hf_state_dict(t.model, t.params)
    reference = {name: p.detach().numpy() for name, p in t.hf.state_dict().items()}
    if t.model.tied:  # a tied head is not a separate parameter
        reference.pop("lm_head.weight")
        assert "lm_head.weight" not in exported
    assert sorted(exported) == sorted(reference)
    for name, array in exported.items():
        assert array.dtype == np.float32, name
        np.testing.assert_array_equal(array, reference[name], err_msg=name)

    save_file(exported, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(t.folder / "config.json", tmp_path / "config.json")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids((2, 9), seed=5).astype(np.int64)
    mask = _left_padded_mask(2, 9, pads=(0, 2)).astype(np.int64)
    before = hf_models.hf_logits(t.hf, ids, mask)
    after = hf_models.hf_logits(reloaded, ids, mask)
    assert _max_diff(before, after) <= 1e-6

    # ... and jpeft reads its own export back to the same tree.
    model, params = jpeft.models.from_pretrained(tmp_path)
    assert model == t.model
    jax.tree.map(np.testing.assert_array_equal, params, t.params)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sharded_checkpoint_loads_like_single_file(tiny, kind, tmp_path):
    t = tiny(kind)
    t.hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert {name for name in index["weight_map"].values()} == {s.name for s in shards}

    model, params = jpeft.models.from_pretrained(tmp_path)
    assert model == t.model
    assert jax.tree.structure(params) == jax.tree.structure(t.params)
    jax.tree.map(np.testing.assert_array_equal, params, t.params)


def test_loading_hands_each_layer_apart_and_maps_no_file(tiny):
    """A transform sees each stacked parameter one layer at a time (``[1, ...]``), the
    stacked result equals a plain load, and while loading the checkpoint's file is never
    memory-mapped (a mapped file's pages count in the process's resident memory beside
    the parameters built from them)."""
    t = tiny("llama")
    files = {str(f.resolve()) for f in t.folder.glob("*.safetensors")}
    seen: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    mapped: list[str] = []

    def record(path, leaf):
        seen.append((path, leaf.shape))
        with open("/proc/self/maps") as maps:
            mapped.extend(line.split()[-1] for line in maps if line.split()[-1] in files)
        return leaf

    _, params = jpeft.models.from_pretrained(t.folder, transform=record)
    jax.tree.map(np.testing.assert_array_equal, params, t.params)
    assert mapped == []
    layers = t.model.num_layers
    stacked = [entry.path for entry in t.model.hf_layout() if entry.layers is not None]
    assert stacked
    for path in stacked:
        shapes = [shape for p, shape in seen if p == path]
        full = tree.get_path(t.params, path).shape
        assert shapes == [(1, *full[1:])] * layers, path


def test_loading_compiles_no_program(tiny, caplog):
    """Reading a checkpoint builds its stacks on the host: no XLA program is compiled (the
    device-side stacking compiled two per leaf shape, 0.7 s of a 4-bit Llama's load)."""
    t = tiny("llama")
    with jax.log_compiles(), caplog.at_level("WARNING"):
        _, params = jpeft.models.from_pretrained(t.folder, dtype=jnp.bfloat16)
        jax.block_until_ready(params)
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == []


@pytest.mark.parametrize("source_dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("shape", [(517, 1030), (2, 300, 613)])
def test_to_jax_copies_big_transposed_arrays_exactly(source_dtype, shape):
    """Big arrays are transposed and converted by a blocked copy on two threads: every
    value lands where numpy's transpose puts it, with the cast numpy makes (shapes that are
    not multiples of the 256-row block, an odd split of rows between the threads)."""
    values = np.random.default_rng(0).normal(size=shape) * 50
    array = values.astype(jnp.dtype(source_dtype))
    for transposed in (True, False):
        leaf = hf_layout.to_jax(array, transposed, jnp.float32)
        view = np.swapaxes(array, -1, -2) if transposed else array
        expected = view if source_dtype == "int8" else view.astype(np.float32)
        assert leaf.dtype == expected.dtype
        np.testing.assert_array_equal(np.asarray(leaf), expected)


# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per operation). The tiny
# models' logits are ~0.5 in size and the observed bf16-vs-f32 difference is ~0.003; 0.03
# (a few percent of the logit scale) allows for the rounding accumulated over two layers
# while still failing if bf16 loading scrambled or dropped a weight.
BF16_ATOL = 0.03


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bfloat16_loading(tiny, kind):
    t = tiny(kind)
    model, params = jpeft.models.from_pretrained(t.folder, dtype=jnp.bfloat16)
    assert model == t.model
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ids = jnp.asarray(_ids((BATCH, STEPS), seed=6))
    mask = jnp.asarray(_left_padded_mask(BATCH, STEPS, pads=(0, 2)))
    low = _forward(model, params, ids, mask)
    assert low.dtype == jnp.bfloat16
    high = _forward(t.model, t.params, ids, mask)
    real = np.asarray(mask).astype(bool)
    assert _max_diff(low, high, real) <= BF16_ATOL


# ----------------------------------------------------------------------------- jit


def test_model_is_a_static_jit_argument_without_recompiling(tiny):
    t = tiny("llama")
    again, params_again = jpeft.models.from_pretrained(t.folder)
    assert again is not t.model
    assert again == t.model and hash(again) == hash(t.model)

    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def logits(model, params, ids):
        traces.append(model)  # runs only while tracing
        return model(params, ids)

    ids = jnp.asarray(_ids((BATCH, STEPS), seed=7))
    first = logits(t.model, t.params, ids)
    # An equal model, other parameter arrays and other ids of the same shapes: no retrace.
    second = logits(again, params_again, (ids + 1) % VOCAB)
    assert len(traces) == 1
    assert logits._cache_size() == 1
    assert _max_diff(first, _forward(t.model, t.params, ids, jnp.ones_like(ids))) <= SELF_ATOL
    assert _max_diff(second, first) > 0  # it really ran on the new ids
    # The counter does count: another shape, or another model, traces again.
    logits(t.model, t.params, ids[:, :4])
    assert len(traces) == 2
    logits(dataclasses.replace(t.model, remat=None), t.params, ids)
    assert len(traces) == 3


def test_remat_none_is_no_remat_and_unknown_names_fail(tiny):
    t = tiny("llama")
    assert dataclasses.replace(t.model, remat="none").remat is None
    assert dataclasses.replace(t.model, remat="none") == dataclasses.replace(t.model, remat=None)
    with pytest.raises(ValueError, match="unknown remat policy 'nothing'"):
        dataclasses.replace(t.model, remat="nothing")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_remat_policies_change_memory_not_gradients(tiny, family):
    """Every layer remat policy gives the LoRA gradients of no remat at all (up to float32
    summation order); an unknown policy name fails when the model is made."""
    t = tiny(family)
    params = jpeft.lora.apply(
        t.params, rank=4, targets="all-linear", init_lora_weights=False, key=jax.random.key(0)
    )
    trainable, frozen = jpeft.split(params)
    ids = jnp.asarray(_ids((BATCH, STEPS), seed=3))

    def grads(remat):
        model = dataclasses.replace(t.model, remat=remat)

        def loss(trainable):
            return jpeft.train.causal_lm_loss(
                model, jpeft.combine(trainable, frozen), {"input_ids": ids}
            )[0]

        return jax.jit(jax.grad(loss))(trainable)

    reference = grads(None)
    for remat in ["nothing_saveable", "save_mlp", "save_matmuls", "dots_saveable"]:
        for got, want in zip(
            jax.tree.leaves(grads(remat)), jax.tree.leaves(reference), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=remat)
    with pytest.raises(ValueError, match="unknown remat policy 'save_everything'"):
        dataclasses.replace(t.model, remat="save_everything")


# ----------------------------------------------------------------------------- generation


def test_greedy_generate_tokens_equals_naive_argmax_loop(tiny):
    t = tiny("llama")
    new = 6
    prompts = [_ids((6,), seed=8), _ids((3,), seed=9)]  # 6 + 6 new = STEPS
    width = max(len(p) for p in prompts)
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1

    got = np.asarray(generate_tokens(t.model, t.params, ids, mask, max_new_tokens=new))
    assert got.shape == (2, new) and got.dtype == np.int32
    # Decoding with the layers sliced apart (the CPU default) and in the scan agree.
    for apart in (True, False):
        again = generate_tokens(
            t.model, t.params, ids, mask, max_new_tokens=new, layers_apart=apart
        )
        np.testing.assert_array_equal(np.asarray(again), got)

    # Full recomputation without a cache, in one buffer of the final width (one compile):
    # attention is causal, so the logits at column c do not depend on the not yet
    # generated (zero) tokens after it.
    seq = np.concatenate([ids, np.zeros((2, new), np.int32)], axis=1)
    seq_mask = np.concatenate([mask, np.ones((2, new), np.int32)], axis=1)
    for step in range(new):
        logits = _forward(t.model, t.params, jnp.asarray(seq), jnp.asarray(seq_mask))
        seq[:, width + step] = np.asarray(jnp.argmax(logits[:, width + step - 1], axis=-1))
    np.testing.assert_array_equal(got, seq[:, width:])

    # An end-of-sequence id stops a row: after a row's first eos, the rest is that eos.
    eos = int(got[0, 2])
    stopped = np.asarray(
        generate_tokens(t.model, t.params, ids, mask, max_new_tokens=new, eos_token_ids=(eos,))
    )
    for row in range(2):
        hits = np.flatnonzero(got[row] == eos)
        end = hits[0] + 1 if hits.size else new
        np.testing.assert_array_equal(stopped[row, :end], got[row, :end])
        assert (stopped[row, end:] == eos).all()
    assert (stopped[0, 3:] == eos).all()
