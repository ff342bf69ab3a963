"""Bottleneck adapters: the maths of a block against numpy, AdapterHub's own adapters and
logits (committed fixtures, made by tests/fixtures/make_adapterhub_fixtures.py in a venv with
`adapters`), the AdapterHub folder both ways, the command line, and bad input. The contract
suite runs on the default config through tests/test_methods.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import contract
import hf_models
import jax
import numpy as np
import pytest
import safetensors.numpy

import jpeft
from jpeft import bottleneck, cli, tree
from jpeft.hf import adapterhub

FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"
ADAPTERHUB_ATOL = 1e-4  # float32 logits, torch vs XLA (observed ~4e-6)
BLOCK_ATOL = 1e-5  # float32, one block, XLA vs numpy
CONFIGS = {
    "seq_bn": bottleneck.SeqBnConfig(reduction_factor=4),
    "double_seq_bn": bottleneck.DoubleSeqBnConfig(reduction_factor=4),
    "par_bn": bottleneck.ParBnConfig(),
    "residual_after_add": bottleneck.BnConfig(
        mh_adapter=True, residual_before_ln=False, original_ln_after=False, scaling="channel"
    ),
    "learned_gelu": bottleneck.BnConfig(
        non_linearity="gelu", original_ln_before=False, scaling="learned"
    ),
}


@pytest.fixture(scope="module", params=["llama-tied-bias", "gpt2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_models.make(request.param, folder, initializer_range=contract.INIT_STD)
    return jpeft.models.from_pretrained(folder)


def _randomized(params: dict, seed: int = 1) -> dict:
    """Every adapter array drawn at random: the inits zero the biases (and ParBn's ``U``)."""
    rng = np.random.default_rng(seed)
    trainable, frozen = jpeft.split(params)
    trainable = jax.tree.map(
        lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape, np.float32), trainable
    )
    return jpeft.combine(trainable, frozen)


# ----------------------------------------------------------------------------- numpy reference


def _np_adapter_step(h, o, node):
    """AdapterHub's Adapter / ParallelAdapter (pre_forward, forward, post_forward) with no
    layer norm, as its Llama and GPT-2 layers call them: `o` the sublayer output, `h` the
    residual input."""
    if node is None:
        return h + o
    acts = {"relu": lambda x: np.maximum(x, 0), "swish": lambda x: x / (1 + np.exp(-x))}
    acts["gelu"] = lambda x: np.asarray(jax.nn.gelu(x, approximate=False))

    def adapter(z):
        hidden = acts[node.non_linearity](z @ node.down + node.down_bias)
        up = hidden @ node.up + node.up_bias
        return up * (node.scaling if node.learned_scaling is None else node.learned_scaling)

    if node.is_parallel:
        hidden = o + adapter(h)
    else:
        residual = o
        x = o + h if node.original_ln_before else o
        if not node.residual_before_ln:
            residual = x
        hidden = adapter(x) + residual
    return hidden + h if node.original_ln_after else hidden


def _np_finish_block(model, layer, h, attn):
    """Each model's block after attention, in numpy: output projection, adapter step, norm,
    MLP, adapter step."""
    c = model.config
    nodes = {}
    weights = {}
    for option, attribute in bottleneck.LOCATIONS.items():
        module = tree.get_path(layer, getattr(model, attribute))
        w = module["weight"]
        nodes[option] = w if isinstance(w, bottleneck.BottleneckAdapter) else None
        weights[option] = (
            np.asarray(w.w if nodes[option] else w),
            None if module.get("bias") is None else np.asarray(module["bias"]),
        )
    nodes = {k: None if v is None else jax.tree.map(np.asarray, v) for k, v in nodes.items()}

    def project(x, option):
        w, b = weights[option]
        return x @ w + (0 if b is None else b)

    attn = attn.reshape(*attn.shape[:2], -1)
    h = _np_adapter_step(h, project(attn, "mh_adapter"), nodes["mh_adapter"])
    if isinstance(model, jpeft.models.llama.Llama):
        norm = np.asarray(layer["post_attention_layernorm"]["weight"])
        x = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + c.rms_norm_eps) * norm
        mlp = layer["mlp"]
        gate, up = (x @ np.asarray(mlp[n]["weight"]) + np.asarray(mlp[n]["bias"]) for n in
                    ("gate_proj", "up_proj"))  # fmt: skip
        x = gate / (1 + np.exp(-gate)) * up
    else:
        ln = layer["ln_2"]
        mean, var = np.mean(h, -1, keepdims=True), np.var(h, -1, keepdims=True)
        x = (h - mean) / np.sqrt(var + c.layer_norm_epsilon) * np.asarray(ln["weight"])
        x = x + np.asarray(ln["bias"])
        x = x @ np.asarray(layer["mlp"]["c_fc"]["weight"]) + np.asarray(
            layer["mlp"]["c_fc"]["bias"]
        )
        x = np.asarray(jax.nn.gelu(x, approximate=True))
    return _np_adapter_step(h, project(x, "output_adapter"), nodes["output_adapter"])


@pytest.mark.parametrize("name", CONFIGS)
def test_a_block_computes_adapterhubs_maths(name, tiny):
    model, params = tiny
    adapted = _randomized(
        bottleneck.apply(params, model=model, key=jax.random.key(0), config=CONFIGS[name])
    )
    layer = jax.tree.map(lambda x: x[1], tree.get_path(adapted, model.layers_path))
    rng = np.random.default_rng(0)
    d = jpeft.nn.shape(model.embedding(params))[-1]
    h = rng.standard_normal((2, 5, d), np.float32)
    attn = rng.standard_normal((2, 5, d // model.head_dim, model.head_dim), np.float32)
    got = jax.jit(model._finish_block)(layer, h, attn)
    want = _np_finish_block(model, layer, h, attn)
    np.testing.assert_allclose(np.asarray(got), want, atol=BLOCK_ATOL, rtol=1e-5)
    base = _np_finish_block(model, jax.tree.map(lambda x: x[1], tree.get_path(
        params, model.layers_path)), h, attn)  # fmt: skip
    assert np.abs(want - base).max() > 0.1  # the adapters do change the block


def test_the_mam_init_is_an_identity_and_the_others_are_not(tiny):
    model, params = tiny
    data = contract.batch(97)
    parallel = CONFIGS["par_bn"]
    add = lambda p, k: bottleneck.apply(p, model=model, key=k, config=parallel)  # noqa: E731
    contract.check_identity_at_init(model, params, add, data)
    base = np.asarray(model(params, data["input_ids"]))
    for init in ("bert", "houlsby"):
        adapted = bottleneck.apply(params, model=model, key=jax.random.key(0), init_weights=init)
        assert np.abs(np.asarray(model(adapted, data["input_ids"])) - base).max() > 0


def test_the_inits_draw_adapterhubs_distributions(tiny):
    model, params = tiny
    spread = {}
    for init in bottleneck.INIT_WEIGHTS:
        adapted = bottleneck.apply(params, model=model, key=jax.random.key(0), init_weights=init,
                                   reduction_factor=1)  # fmt: skip
        node = tree.get_path(adapted, bottleneck.placements(model, bottleneck.BnConfig())[
            "output_adapter"])["weight"]  # fmt: skip
        assert not np.asarray(node.down_bias).any() and not np.asarray(node.up_bias).any()
        spread[init] = (np.asarray(node.down), np.asarray(node.up))
    d = spread["bert"][0].shape[-2]
    np.testing.assert_allclose([x.std() for x in spread["bert"]], 0.02, rtol=0.15)
    down, up = spread["mam_adapter"]
    assert not up.any() and np.abs(down).max() <= d**-0.5
    np.testing.assert_allclose(down.std(), d**-0.5 / np.sqrt(3), rtol=0.15)  # U(±1/√d)
    for x in spread["houlsby"]:
        assert np.abs(x).max() <= 0.02 and 0.006 < x.std() < 0.01  # N(0, 0.01²) cut at ±2σ


# ----------------------------------------------------------------------------- AdapterHub


ADAPTERHUB_CASES = [(m, a) for m in ("llama", "gpt2") for a in ("seq_bn", "double_seq_bn",
                    "par_bn", "custom")]  # fmt: skip


@pytest.fixture(scope="module")
def adapterhub_bases():
    return {m: jpeft.models.from_pretrained(FIXTURES / m / "base") for m in ("llama", "gpt2")}


@pytest.mark.parametrize(("kind", "name"), ADAPTERHUB_CASES)
def test_adapterhubs_adapters_import_with_its_logits_and_counts(kind, name, adapterhub_bases,
                                                                tmp_path):  # fmt: skip
    model, base = adapterhub_bases[kind]
    folder = FIXTURES / kind / name
    expected = np.load(folder / "expected.npz")
    params = jpeft.hf.import_adapterhub(base, folder)
    logits = np.asarray(jax.jit(model)(params, expected["input_ids"]))
    np.testing.assert_allclose(logits, expected["logits"], atol=ADAPTERHUB_ATOL, rtol=0)
    assert jpeft.count_parameters(params) == (int(expected["trainable"]), int(expected["total"]))
    # Exported again, it reads back bitwise, with AdapterHub's config (the fixture script
    # checks that AdapterHub's load_adapter reads such exports to the same logits).
    out = jpeft.hf.export_adapterhub(params, tmp_path / "export", name=name)
    again = jpeft.hf.import_adapterhub(base, out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    theirs = json.loads((folder / adapterhub.CONFIG_FILE).read_text())
    ours = json.loads((out / adapterhub.CONFIG_FILE).read_text())
    for key in ("name", "model_type", "hidden_size"):
        assert ours[key] == theirs[key], key
    for key, value in ours["config"].items():
        if key != "init_weights":  # spent: the weights are what count
            assert value == theirs["config"][key], key
    assert set(safetensors.numpy.load_file(out / adapterhub.SAFETENSORS_FILE)) == set(
        safetensors.numpy.load_file(folder / adapterhub.SAFETENSORS_FILE)
    )


def test_a_torch_pickle_reads_with_torch_and_is_refused_without(adapterhub_bases, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    import torch

    _, base = adapterhub_bases["gpt2"]
    source = FIXTURES / "gpt2" / "custom"
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(source / adapterhub.CONFIG_FILE, folder)
    tensors = safetensors.numpy.load_file(source / adapterhub.SAFETENSORS_FILE)
    torch.save({k: torch.tensor(v) for k, v in tensors.items()}, folder / adapterhub.TORCH_FILE)
    want = jpeft.hf.import_adapterhub(base, source)
    got = jpeft.hf.import_adapterhub(base, folder)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(
        jpeft.CheckpointError, match=r"pytorch_adapter\.bin is a torch pickle.*needs torch"
    ):
        jpeft.hf.import_adapterhub(base, folder)


def test_bad_adapterhub_folders_are_refused(adapterhub_bases, tmp_path):
    _, base = adapterhub_bases["llama"]
    source = FIXTURES / "llama" / "seq_bn"

    def folder_with(config=None, tensors=None):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        meta = json.loads((source / adapterhub.CONFIG_FILE).read_text())
        meta["config"].update(config or {})
        (folder / adapterhub.CONFIG_FILE).write_text(json.dumps(meta))
        weights = safetensors.numpy.load_file(source / adapterhub.SAFETENSORS_FILE)
        safetensors.numpy.save_file(
            {**weights, **(tensors or {})}, folder / adapterhub.SAFETENSORS_FILE
        )
        return folder

    cases = [
        (tmp_path / "missing", "does not exist"),
        (folder_with({"ln_before": True}), "ln_before=True is not supported"),
        (folder_with({"residual_before_ln": "post_add"}), "'post_add' needs a layer norm"),
        (folder_with({"architecture": "lora"}), "holds a 'lora' adapter"),
        (folder_with({"reduction_factor": {"default": 16}}), "reduction_factor must be a positive"),
        (folder_with({"mh_adapter": True}), r"lacks model\.layers\.0\.attention_adapters"),
        (folder_with({"reduction_factor": 2}), r"has shape \(8, 32\), expected \(16, 32\)"),
        (folder_with(tensors={"model.layers.0.extra": np.zeros(2, np.float32)}),
         r"tensors its config does not imply: \['model\.layers\.0\.extra'\]"),
    ]  # fmt: skip
    for folder, message in cases:
        with pytest.raises(jpeft.CheckpointError, match=message):
            jpeft.hf.import_adapterhub(base, folder)


def test_export_refuses_what_one_adapterhub_config_cannot_hold(tiny, tmp_path):
    model, params = tiny
    with pytest.raises(ValueError, match="params hold no bottleneck adapter"):
        jpeft.hf.export_adapterhub(params, tmp_path)
    both = bottleneck.apply(params, model=model, key=jax.random.key(0), mh_adapter=True)
    with pytest.raises(ValueError, match="PEFT does not have.*jpeft.hf.export_adapterhub"):
        jpeft.hf.export_peft(both, tmp_path)
    path = bottleneck.placements(model, bottleneck.BnConfig())["output_adapter"]
    entry = tree.get_path(both, path)
    entry["weight"] = dataclasses.replace(entry["weight"], non_linearity="swish")
    with pytest.raises(ValueError, match="AdapterHub's config is one for all adapters"):
        jpeft.hf.export_adapterhub(both, tmp_path)


# ----------------------------------------------------------------------------- bad input


def test_bad_options_are_refused_with_the_value_named(tiny):
    model, params = tiny
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"reduction_factor=64 leaves no bottleneck unit for "
                       r"hidden size 32 \(hidden // reduction_factor = 0\)"):  # fmt: skip
        bottleneck.apply(params, model=model, key=key, reduction_factor=64)
    cases = {
        "unknown non_linearity 'swishy'; expected one of": dict(non_linearity="swishy"),
        "reduction_factor must be a positive number": dict(reduction_factor=0),
        "mh_adapter and output_adapter are both False": dict(output_adapter=False),
        "init_weights 'xavier' is not one of": dict(init_weights="xavier"),
        "scaling 'big' is neither a number nor one of": dict(scaling="big"),
        "dropout=0.1 is not supported by jpeft's bottleneck adapters; expected 0.0": dict(
            dropout=0.1
        ),
        "leave_out=\\(1,\\) is not supported": dict(leave_out=[1]),
    }
    for message, options in cases.items():
        with pytest.raises(ValueError, match=message):
            bottleneck.apply(params, model=model, key=key, **options)
    adapted = bottleneck.apply(params, model=model, key=key)
    with pytest.raises(ValueError, match="already has a bottleneck adapter"):
        bottleneck.apply(adapted, model=model, key=key)
    with pytest.raises(TypeError, match="BottleneckAdapter.*does not fold into the base"):
        tree.materialize(adapted)


# ----------------------------------------------------------------------------- command line


def test_the_cli_trains_and_generates_and_refuses_to_merge(tmp_path, capsys):
    import cli_fixtures

    tiny = cli_fixtures.make_tiny_chat_model(tmp_path)
    out = tmp_path / "run"
    argv = ["train", tiny["model"], "--method", "bottleneck", "--data", tiny["data"], "--out", out,
            "--mh-adapter", "--reduction-factor", "4", "--non-linearity", "swish",
            "--no-original-ln-before", "--max-steps", "3", "--batch-size", "4",
            "--no-progress"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    metadata = jpeft.checkpoint.read_adapter_metadata(out / "adapter")
    assert {e["type"] for e in metadata["entries"]} == {"bottleneck"}
    assert len(metadata["entries"]) == 2  # after the attention and after the MLP
    config = metadata["config"]
    assert (config["method"], config["mh_adapter"], config["reduction_factor"]) == (
        "bottleneck",
        True,
        4,
    )
    assert not (out / "hf_adapter").exists()  # Hugging Face PEFT has no bottleneck adapters
    capsys.readouterr()
    code = cli.main(["generate", str(tiny["model"]), "--adapter", str(out / "adapter"),
                     "--prompt", "where is", "--max-new-tokens", "3"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code = cli.main(["merge", str(tiny["model"]), "--adapter", str(out / "adapter"),
                     "--out", str(tmp_path / "merged")])  # fmt: skip
    assert code == 2 and "does not fold into the base weights" in capsys.readouterr().err


def test_the_cli_reads_adapterhub_folders(tmp_path, capsys):
    base, folder = FIXTURES / "llama" / "base", FIXTURES / "llama" / "double_seq_bn"
    code = cli.main(["merge", str(base), "--adapter", str(folder), "--out", str(tmp_path)])
    assert code == 2 and "BottleneckAdapter (bottleneck) does not fold" in capsys.readouterr().err
    imported, exported = tmp_path / "imported", tmp_path / "exported"
    steps = (("import-hf", folder, imported), ("export-hf", imported, exported))
    for command, source, target in steps:
        assert cli.main([command, str(base), "--adapter", str(source), "--out", str(target)]) == 0
    assert "wrote the AdapterHub adapter" in capsys.readouterr().out  # the default for bottleneck
    _, params = jpeft.models.from_pretrained(base)
    original = jpeft.hf.import_adapterhub(params, folder)
    for got, want in zip(
        jax.tree.leaves(jpeft.hf.import_adapterhub(params, exported)),
        jax.tree.leaves(original),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    code = cli.main(["export-hf", str(base), "--adapter", str(imported), "--out",
                     str(tmp_path / "peft"), "--format", "peft"])  # fmt: skip
    assert code == 2 and "export_adapterhub" in capsys.readouterr().err
