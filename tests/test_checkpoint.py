"""Adapter-only checkpoints and resumable training state (jpeft.checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
from hashlib import sha256
from pathlib import Path

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import jpeft
from jpeft import checkpoint, lora, train_state, tree

_IDS = np.array([[5, 17, 3, 44, 90, 2, 61, 8], [1, 33, 72, 9, 14, 56, 0, 27]])
_QV = dict(rank=4, targets=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``build(kind) -> (model, params)``: a tiny random transformers model, loaded once."""
    cache = {}

    def get(kind):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(kind)
            hf_models.make(kind, folder)
            cache[kind] = jpeft.models.from_pretrained(folder)
        return cache[kind]

    return get


def _equal_trees(x, y) -> bool:
    """Same structure (node types and static fields included) and bitwise-equal leaves."""
    if jax.tree.structure(x) != jax.tree.structure(y):
        return False
    return all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    )


def _size(directory) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


@pytest.mark.parametrize(
    "kind, options",
    [
        ("llama", {}),
        ("llama", dict(layers_to_transform=[1], modules_to_save=["lm_head"])),
        ("llama-tied-bias", dict(bias="all", lora_dropout=0.1)),
    ],
    ids=["qv", "layers-modules_to_save", "bias-all"],
)
def test_round_trip_is_exact(build, tmp_path, kind, options):
    model, base = build(kind)
    params = lora.apply(base, **_QV, **options, key=jax.random.key(1))
    config = {"r": 4, "target_modules": ["q_proj", "v_proj"], **options}
    checkpoint.save_adapter(params, tmp_path / "adapter", config=config)
    loaded = checkpoint.load_adapter(base, tmp_path / "adapter")

    assert _equal_trees(lora.extract(loaded), lora.extract(params))
    assert _equal_trees(loaded, params)
    forward = jax.jit(model.__call__)
    np.testing.assert_array_equal(forward(loaded, _IDS), forward(params, _IDS))

    metadata = checkpoint.read_adapter_metadata(tmp_path / "adapter")
    assert metadata["config"] == json.loads(json.dumps(config))
    entries = {".".join(e["path"]): e for e in metadata["entries"]}
    q = entries["model.layers.self_attn.q_proj.weight"]
    assert q["type"] == "lora"
    a = np.asarray(params["model"]["layers"]["self_attn"]["q_proj"]["weight"].a)
    digest = sha256(a.tobytes()).hexdigest()
    assert q["arrays"]["a"] == {"shape": [2, 32, 4], "dtype": "float32", "sha256": digest}
    assert q["static"] == {
        "dropout": options.get("lora_dropout", 0.0),
        "layers": options.get("layers_to_transform"),
        "rslora": False,
    }
    trained = {path: e["static"] for path, e in entries.items() if e["type"] == "trainable"}
    if "modules_to_save" in options:
        assert trained == {"lm_head.weight": {"copied": True}}
    elif "bias" in options:
        assert "model.layers.self_attn.q_proj.bias" in trained
        assert "model.layers.mlp.down_proj.bias" in trained
        assert all(static == {"copied": False} for static in trained.values())
    else:
        assert trained == {}


def test_adapter_folder_is_much_smaller_than_the_model(build, tmp_path):
    _, base = build("llama")
    checkpoint.save_adapter(lora.apply(base, **_QV, key=jax.random.key(0)), tmp_path / "adapter")
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(base))
    assert _size(tmp_path / "adapter") * 4 < model_bytes


def test_smollm2_shaped_qv_adapter_is_under_5_mb(tmp_path):
    """SmolLM2-135M: 30 layers, hidden 576, q_proj [576, 576], v_proj [576, 192]; r=8."""
    layers = 30
    base = {
        "model": {
            "layers": {
                "self_attn": {
                    "q_proj": {"weight": jnp.zeros((layers, 576, 576))},
                    "v_proj": {"weight": jnp.zeros((layers, 576, 192))},
                }
            }
        }
    }
    # Random A and B (not B = 0), so that compression cannot hide the size of trained factors.
    params = lora.apply(
        base, rank=8, targets=["q_proj", "v_proj"], key=jax.random.key(0), init_lora_weights=False
    )
    checkpoint.save_adapter(params, tmp_path / "adapter")

    # What is saved: the factors, 30 x 8 x (576 + 576) + 30 x 8 x (576 + 192) = 460,800
    # float32 values, and 2 x 30 float32 scales; 1,843,440 bytes in all.
    assert sum(x.nbytes for x in jax.tree.leaves(lora.extract(params))) == 1_843_440
    size = _size(tmp_path / "adapter")
    assert size < 5_000_000, f"adapter folder is {size:,} bytes"


def test_load_onto_a_base_of_another_hidden_size_names_path_and_shapes(build, tmp_path):
    _, base = build("llama")
    checkpoint.save_adapter(lora.apply(base, **_QV, key=jax.random.key(0)), tmp_path / "a")
    wider = jax.tree.map(lambda x: jnp.zeros([48 if n == 32 else n for n in x.shape]), base)
    with pytest.raises(jpeft.CheckpointError) as info:
        checkpoint.load_adapter(wider, tmp_path / "a")
    message = str(info.value)
    assert "model.layers.self_attn.q_proj.weight" in message
    assert "(2, 32, 32)" in message and "(2, 48, 48)" in message
    assert isinstance(info.value, ValueError)

    del wider["model"]["layers"]["self_attn"]["q_proj"]
    with pytest.raises(ValueError, match=r"q_proj\.weight has no counterpart"):
        checkpoint.load_adapter(wider, tmp_path / "a")


def _mutate_json(folder: Path, change) -> None:
    path = folder / checkpoint.METADATA_FILE
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))


def _entry(metadata: dict) -> dict:
    return metadata["entries"][0]


@pytest.mark.parametrize(
    "change, match",
    [
        (None, r"jpeft_adapter\.json is not valid JSON"),
        (lambda m: m.update(format_version=99), r"jpeft_adapter\.json has format version 99"),
        (
            lambda m: _entry(m).update(type="vera"),
            r"q_proj\.weight: unknown adapter node kind 'vera'",
        ),
        (lambda m: m.pop("entries"), r"jpeft_adapter\.json is malformed: KeyError"),
        (lambda m: m.update(arrays="../elsewhere"), r"jpeft_adapter\.json is malformed"),
        (
            lambda m: _entry(m)["arrays"]["a"].update(shape=[2, 32, 8]),
            r"jpeft_arrays_[0-9a-f]+: array model\.layers\.self_attn\.q_proj\.weight\.a is "
            r"stored with shape \(2, 32, 4\) and dtype float32, but .*jpeft_adapter\.json "
            r"expects shape \(2, 32, 8\)",
        ),
        (
            lambda m: _entry(m)["arrays"]["b"].update(dtype="bfloat16"),
            r"q_proj\.weight\.b is stored with shape \(2, 4, 32\) and dtype float32, but .* "
            r"dtype bfloat16",
        ),
        (
            lambda m: _entry(m)["arrays"].pop("scale"),
            r"holds arrays that .*jpeft_adapter\.json does not expect: "
            r"\['model\.layers\.self_attn\.q_proj\.weight\.scale'\]",
        ),
    ],
    ids=[
        "corrupt",
        "version",
        "node-type",
        "no-entries",
        "arrays-name",
        "shape",
        "dtype",
        "extra-array",
    ],
)
def test_bad_adapter_files_fail_clearly(build, tmp_path, change, match):
    _, base = build("llama")
    folder = tmp_path / "adapter"
    checkpoint.save_adapter(lora.apply(base, **_QV, key=jax.random.key(0)), folder)
    if change is None:
        (folder / checkpoint.METADATA_FILE).write_text('{"format_version": 1, "entr')
    else:
        _mutate_json(folder, change)
    with pytest.raises(jpeft.CheckpointError, match=match):
        checkpoint.load_adapter(base, folder)


def test_missing_folders_fail_clearly(build, tmp_path):
    _, base = build("llama")
    with pytest.raises(jpeft.CheckpointError, match=r"adapter folder .*nowhere does not exist"):
        checkpoint.load_adapter(base, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(jpeft.CheckpointError, match=r"empty has no jpeft_adapter\.json"):
        checkpoint.load_adapter(base, tmp_path / "empty")
    folder = tmp_path / "adapter"
    checkpoint.save_adapter(lora.apply(base, **_QV, key=jax.random.key(0)), folder)
    arrays = checkpoint.read_adapter_metadata(folder)["arrays"]
    shutil.rmtree(folder / arrays)
    with pytest.raises(jpeft.CheckpointError, match=rf"{arrays}, named by .* does not exist"):
        checkpoint.load_adapter(base, folder)


def test_save_refuses_a_tree_without_adapter_or_a_non_json_config(build, tmp_path):
    _, base = build("llama")
    with pytest.raises(ValueError, match="hold no adapter"):
        checkpoint.save_adapter(base, tmp_path / "a")
    params = lora.apply(base, **_QV, key=jax.random.key(0))
    with pytest.raises(ValueError, match="config must be JSON-serialisable"):
        checkpoint.save_adapter(params, tmp_path / "a", config={"r": object()})
    assert not (tmp_path / "a").exists()


def test_crash_mid_save_leaves_previous_adapter_loadable(build, tmp_path, monkeypatch):
    _, base = build("llama")
    folder = tmp_path / "adapter"
    old = lora.apply(base, **_QV, key=jax.random.key(0))
    new = lora.apply(base, **_QV, key=jax.random.key(1))
    checkpoint.save_adapter(old, folder, config={"run": "old"})
    old_json = (folder / checkpoint.METADATA_FILE).read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    # A crash while Orbax writes the new arrays ...
    with monkeypatch.context() as patch:
        patch.setattr(ocp.StandardCheckpointer, "save", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            checkpoint.save_adapter(new, folder, config={"run": "new"})
    assert (folder / checkpoint.METADATA_FILE).read_text() == old_json
    assert _equal_trees(checkpoint.load_adapter(base, folder), old)

    # ... and one just before the commit, with the new arrays complete on disk.
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == checkpoint.METADATA_FILE:
            raise RuntimeError("simulated crash")
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        with pytest.raises(RuntimeError, match="simulated crash"):
            checkpoint.save_adapter(new, folder, config={"run": "new"})
    assert len(list(folder.glob("jpeft_arrays_*"))) > 1  # the orphaned new arrays
    assert (folder / checkpoint.METADATA_FILE).read_text() == old_json
    assert _equal_trees(checkpoint.load_adapter(base, folder), old)

    # The next save succeeds and sweeps what the crashes left behind.
    checkpoint.save_adapter(new, folder, config={"run": "new"})
    assert _equal_trees(checkpoint.load_adapter(base, folder), new)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [checkpoint.METADATA_FILE, checkpoint.read_adapter_metadata(folder)["arrays"]]
    )


def _trainer(model, optimizer):
    """A jitted step ``(trainable, frozen, opt_state, rng, position) -> (trainable, opt_state,
    rng)`` whose batch is a function of the data position and whose LoRA dropout uses the
    rng."""

    @jax.jit
    def step(trainable, frozen, opt_state, rng, position):
        rng, dropout_key = jax.random.split(rng)
        ids = jax.random.randint(jax.random.fold_in(jax.random.key(7), position), (2, 8), 0, 97)

        def loss(t):
            params = tree.with_rng(tree.combine(t, frozen), dropout_key)
            logits = model(params, ids)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], ids[:, 1:]
            ).mean()

        grads = jax.grad(loss)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, rng

    return step


def test_stopped_and_resumed_run_is_bitwise_identical(build, tmp_path):
    model, base = build("llama")
    options = dict(_QV, lora_dropout=0.1, modules_to_save=["lm_head"])
    optimizer = optax.adamw(1e-2)
    params = lora.apply(base, **options, key=jax.random.key(0))
    trainable, frozen = tree.split(params)
    step = _trainer(model, optimizer)
    # Committed to the device as Orbax's restored arrays are (the rng is restored uncommitted,
    # like a new key), so that the resumed run reuses the straight run's compilations.
    trainable, opt_state = jax.device_put((trainable, optimizer.init(trainable)), jax.devices()[0])
    start = (trainable, opt_state, jax.random.key(42))

    state = start
    for position in range(6):
        state = step(state[0], frozen, *state[1:], position)
    straight_trainable, straight_opt_state, straight_rng = state

    run = tmp_path / "run"
    state = start
    for position in range(3):
        state = step(state[0], frozen, *state[1:], position)
        trainable, opt_state, rng = state
        train_state.save_train_state(
            run,
            position + 1,
            params=trainable,
            opt_state=opt_state,
            data_position=position + 1,
            rng=rng,
            keep=2,
        )
    assert sorted(int(p.name) for p in run.iterdir() if p.name.isdigit()) == [2, 3]
    assert train_state.latest_step(run) == 3
    assert train_state.latest_step(tmp_path / "no-run") is None

    # A fresh process: the adapter re-applied with another init, a fresh optimizer state.
    fresh = lora.apply(base, **options, key=jax.random.key(123))
    fresh_trainable, fresh_frozen = tree.split(fresh)
    restored = train_state.restore_train_state(
        run, params=fresh, opt_state_like=optimizer.init(fresh_trainable)
    )
    assert (restored.step, restored.data_position) == (3, 3)
    assert _equal_trees(restored.params, tree.combine(trainable, fresh_frozen))
    half = train_state.restore_train_state(
        run, params=fresh_trainable, opt_state_like=optimizer.init(fresh_trainable), step=2
    )
    assert half.step == 2 and jax.tree.structure(half.params) == jax.tree.structure(trainable)

    resumed_trainable, resumed_frozen = tree.split(restored.params)
    state = (resumed_trainable, restored.opt_state, restored.rng)
    for position in range(restored.data_position, 6):
        state = step(state[0], resumed_frozen, *state[1:], position)

    assert _equal_trees(state[0], straight_trainable)
    assert _equal_trees(state[1], straight_opt_state)
    np.testing.assert_array_equal(jax.random.key_data(state[2]), jax.random.key_data(straight_rng))


def test_restore_into_a_different_adapter_names_the_array(build, tmp_path):
    _, base = build("llama")
    optimizer = optax.sgd(1e-2)
    trainable, _ = tree.split(lora.apply(base, **_QV, key=jax.random.key(0)))
    train_state.save_train_state(
        tmp_path / "run",
        1,
        params=trainable,
        opt_state=optimizer.init(trainable),
        data_position=4,
        rng=jax.random.PRNGKey(5),
    )
    restored = train_state.restore_train_state(
        tmp_path / "run", params=trainable, opt_state_like=optimizer.init(trainable)
    )
    assert _equal_trees(restored.params, trainable)
    np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(5))  # legacy uint32 key

    other, _ = tree.split(lora.apply(base, **dict(_QV, rank=8), key=jax.random.key(0)))
    with pytest.raises(
        jpeft.CheckpointError,
        match=r"run/1: array params\.model\.layers\.self_attn\.q_proj\.weight\.a is stored "
        r"with shape \(2, 32, 4\) .* expects shape \(2, 32, 8\)",
    ):
        train_state.restore_train_state(
            tmp_path / "run", params=other, opt_state_like=optimizer.init(other)
        )
    with pytest.raises(jpeft.CheckpointError, match="step 1 was not saved: .* holds step 1"):
        train_state.save_train_state(
            tmp_path / "run",
            1,
            params=other,
            opt_state=optimizer.init(other),
            data_position=0,
            rng=jax.random.PRNGKey(0),
        )
    with pytest.raises(jpeft.CheckpointError, match="holds no train state for step 9"):
        train_state.restore_train_state(
            tmp_path / "run", params=trainable, opt_state_like=optimizer.init(trainable), step=9
        )
    with pytest.raises(jpeft.CheckpointError, match="does not exist"):
        train_state.restore_train_state(
            tmp_path / "none", params=trainable, opt_state_like=optimizer.init(trainable)
        )


def test_describe_reads_the_steps_and_array_shapes_of_a_train_state_folder(build, tmp_path):
    _, base = build("llama")
    optimizer = optax.adamw(1e-2)
    trainable, _ = tree.split(
        lora.apply(base, **_QV, modules_to_save=["lm_head"], key=jax.random.key(0))
    )
    opt_state = optimizer.init(trainable)
    run = tmp_path / "run"
    for step in (2, 5):
        train_state.save_train_state(
            run,
            step,
            params=trainable,
            opt_state=opt_state,
            data_position=10 * step,
            rng=jax.random.key(step),
        )

    info = train_state.describe(run)
    assert (info["steps"], info["latest_step"], info["data_position"]) == ([2, 5], 5, 50)
    saved = {}
    for prefix, part in (("params", trainable), ("opt_state", opt_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(part)[0]:
            saved[f"{prefix}.{tree.path_str(path)}"] = (
                list(np.shape(leaf)),
                np.dtype(leaf.dtype).name,
            )
    assert info["arrays"] == saved
    assert info["arrays"]["params.model.layers.self_attn.q_proj.weight.a"] == (
        [2, 32, 4],
        "float32",
    )
    assert info["arrays"]["opt_state.0.count"] == ([], "int32")

    with pytest.raises(jpeft.CheckpointError, match=r"run/5 cannot be read as a jpeft train state"):
        shutil.rmtree(run / "5" / "meta")
        train_state.describe(run)
    with pytest.raises(jpeft.CheckpointError, match=r"empty holds no train state"):
        (tmp_path / "empty").mkdir()
        train_state.describe(tmp_path / "empty")
    with pytest.raises(jpeft.CheckpointError, match=r"train state folder .*nowhere does not exist"):
        train_state.describe(tmp_path / "nowhere")
