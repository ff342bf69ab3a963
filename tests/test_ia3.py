"""(IA)³ against the real `peft`, both ways: jpeft-trained adapters load in `peft.PeftModel`
with peft's logits, merge to peft's ``merge_and_unload`` weights and count as peft counts;
adapters made and saved by peft import into jpeft with peft's logits and export back
unchanged; layers a regex leaves out stay an identity; the command line; bad input. (The
contract runs through tests/test_methods.py.)"""

from __future__ import annotations

import contextlib
import io
import re

import contract
import hf_models
import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import jpeft
from jpeft import cli, ia3, tree

LOGITS_ATOL = 1e-4  # float32 both sides, torch vs XLA summation order (observed ~2e-6)
MERGE_ATOL = 1e-5  # float32: W ⊙ ℓ folded by peft and by jpeft (observed 0)
VOCAB = 97
# A regex that adapts layer 1 only, with a feedforward regex: partial stacked nodes, GPT-2's
# biases scaled in one layer and not the other, and target names PEFT reads as a regex.
GPT2_LAYER_1 = dict(
    target_modules=r"transformer\.h\.1\.(attn\.c_attn|mlp\.c_fc|mlp\.c_proj)",
    feedforward_modules=r".*mlp\.c_proj",
)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_models.make(request.param, folder, initializer_range=contract.INIT_STD)
    return request.param, folder, *jpeft.models.from_pretrained(folder)


def _hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _print_line(fn) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn()
    return out.getvalue().strip()


def _logits(model, params, data) -> np.ndarray:
    return np.asarray(model(params, data["input_ids"], attention_mask=data["attention_mask"]))


def _moved(params, key):
    """`params` with every IA3 vector scaled by a random factor in [0.5, 1.5], the layers a
    regex left out included (they must keep scaling by one)."""
    return contract.scale_field(params, key, ia3.IA3Weight, "vector")


@pytest.mark.parametrize(
    "tiny,options",
    [("llama", {}), ("llama", {"modules_to_save": ["lm_head"]}), ("gpt2", {}),
     ("gpt2", GPT2_LAYER_1)],
    ids=["llama", "llama-modules-to-save", "gpt2", "gpt2-layer-1-regex"],
    indirect=["tiny"],
)  # fmt: skip
def test_jpeft_trained_adapter_loads_in_peft_with_its_logits_merge_and_counts(
    tiny, options, tmp_path
):
    _, folder, model, params = tiny
    adapted = ia3.apply(params, model=model, **options)
    fresh = peft.get_peft_model(_hf(folder), peft.IA3Config(task_type="CAUSAL_LM", **options))
    assert _print_line(lambda: jpeft.print_trainable_parameters(adapted)) == _print_line(
        fresh.print_trainable_parameters
    )
    data = contract.batch(VOCAB)
    trained, losses, _ = contract.run_steps(model, adapted, data, steps=3)
    assert losses[-1] < losses[0]
    trained = _moved(trained, jax.random.key(1))
    out = jpeft.hf.export_peft(trained, tmp_path / "hf")

    peft_model = peft.PeftModel.from_pretrained(_hf(folder), out).eval()
    saved = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    state = peft.get_peft_model_state_dict(peft_model)
    assert set(state) == set(saved)  # nothing missing or unexpected
    assert any(k.endswith(".ia3_l") for k in saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)
    valid = data["attention_mask"].astype(bool)
    ours = _logits(model, trained, data)
    theirs = hf_models.hf_logits(peft_model, data["input_ids"], data["attention_mask"])
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=LOGITS_ATOL)
    assert np.abs(ours - _logits(model, params, data))[valid].max() > 1e-2  # IA3 counts
    merged = peft_model.merge_and_unload().state_dict()
    ours_merged = jpeft.models.to_hf_state_dict(model, ia3.merge(trained))
    assert set(ours_merged) <= set(merged)  # peft lists a tied head twice
    for key, value in ours_merged.items():
        np.testing.assert_allclose(value, merged[key].numpy(), atol=MERGE_ATOL, err_msg=key)


def test_layers_a_regex_leaves_out_stay_an_identity(tmp_path):
    hf_models.make("gpt2", tmp_path / "base", initializer_range=contract.INIT_STD)
    model, params = jpeft.models.from_pretrained(tmp_path / "base")
    adapted = ia3.apply(params, model=model, **GPT2_LAYER_1)
    c_attn = adapted["transformer"]["h"]["attn"]["c_attn"]["weight"]
    assert c_attn.layers == (1,) and not c_attn.feedforward
    assert adapted["transformer"]["h"]["mlp"]["c_proj"]["weight"].feedforward
    trained, _, _ = contract.run_steps(model, adapted, contract.batch(VOCAB), steps=3)
    for _, node in tree.iter_nodes(trained):
        if isinstance(node, ia3.IA3Weight):
            vector = np.asarray(node.vector)
            np.testing.assert_array_equal(vector[0], 1)  # no gradient reached layer 0
            assert np.abs(vector[1] - 1).max() > 1e-3
    # Layer 0 scales by one whatever its stored vector holds, merged or not.
    moved = _moved(trained, jax.random.key(2))
    merged = ia3.merge(moved)
    for name in ("c_attn", "c_proj"):
        np.testing.assert_array_equal(
            merged["transformer"]["h"]["attn"][name]["weight"][0],
            params["transformer"]["h"]["attn"][name]["weight"][0],
        )
    np.testing.assert_array_equal(
        merged["transformer"]["h"]["attn"]["c_attn"]["bias"][0],
        params["transformer"]["h"]["attn"]["c_attn"]["bias"][0],
    )
    jpeft.save_adapter(moved, tmp_path / "adapter")
    loaded = jpeft.load_adapter(params, tmp_path / "adapter")
    data = contract.batch(VOCAB)
    np.testing.assert_array_equal(_logits(model, loaded, data), _logits(model, moved, data))


@pytest.mark.parametrize(
    "kind,config",
    [
        ("llama", dict(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                       feedforward_modules=["up_proj", "down_proj"], modules_to_save=["lm_head"],
                       init_ia3_weights=False)),
        ("gpt2", dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"],
                      feedforward_modules=["mlp.c_proj"])),
    ],
)  # fmt: skip
def test_a_peft_made_adapter_imports_with_peft_logits_and_exports_back(kind, config, tmp_path):
    hf = hf_models.make(kind, tmp_path / "base", initializer_range=contract.INIT_STD)
    torch.manual_seed(1)
    made = peft.get_peft_model(hf, peft.IA3Config(task_type="CAUSAL_LM", **config))
    with torch.no_grad():  # off the ones (and the saved head off the base's)
        for p in made.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    made.eval().save_pretrained(tmp_path / "peft")
    model, params = jpeft.models.from_pretrained(tmp_path / "base")
    ours = jpeft.hf.import_peft(params, tmp_path / "peft")
    assert _print_line(lambda: jpeft.print_trainable_parameters(ours)) == _print_line(
        made.print_trainable_parameters
    )
    data = contract.batch(VOCAB)
    valid = data["attention_mask"].astype(bool)
    theirs = hf_models.hf_logits(made, data["input_ids"], data["attention_mask"])
    np.testing.assert_allclose(_logits(model, ours, data)[valid], theirs[valid], atol=LOGITS_ATOL)
    again = jpeft.hf.export_peft(ours, tmp_path / "again")
    before = safetensors.numpy.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    after = safetensors.numpy.load_file(again / "adapter_model.safetensors")
    assert set(before) == set(after)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_the_cli_trains_generates_merges_and_exports(tmp_path, capsys):
    import cli_fixtures

    tiny = cli_fixtures.make_tiny_chat_model(tmp_path)
    out = tmp_path / "run"
    argv = ["train", tiny["model"], "--method", "ia3", "--data", tiny["data"], "--out", out]
    extra = ["--targets", "q_proj,v_proj,down_proj", "--max-steps", "3", "--batch-size", "4",
             "--lr", "3e-2", "--warmup-steps", "0", "--no-progress"]  # fmt: skip
    assert cli.main([str(a) for a in (*argv, *extra)]) == 0, capsys.readouterr().err
    metadata = jpeft.checkpoint.read_adapter_metadata(out / "adapter")
    assert {e["type"] for e in metadata["entries"]} == {"ia3"}
    assert metadata["config"]["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    for adapter in (out / "adapter", out / "hf_adapter"):  # jpeft's and peft's folders
        code = cli.main(
            ["generate", str(tiny["model"]), "--adapter", str(adapter), "--prompt", "where is",
             "--max-new-tokens", "3"]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
    for command in ("merge", "export-hf"):
        code = cli.main(
            [command, str(tiny["model"]), "--adapter", str(out / "adapter"),
             "--out", str(tmp_path / command)]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
    model, base = jpeft.models.from_pretrained(tiny["model"])
    trained = jpeft.load_adapter(base, out / "adapter")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 7))
    expected = np.asarray(model(trained, ids.astype(np.int32)))
    assert np.abs(expected - np.asarray(model(base, ids.astype(np.int32)))).max() > 1e-3
    served = {
        "merge": _hf(tmp_path / "merge"),
        "export-hf": peft.PeftModel.from_pretrained(_hf(tiny["model"]), tmp_path / "export-hf"),
    }
    for command, hf_model in served.items():
        with torch.no_grad():
            logits = hf_model.eval()(input_ids=torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(logits, expected, atol=LOGITS_ATOL, err_msg=command)


def test_bad_input_is_named(tiny, tmp_path):
    kind, folder, model, params = tiny
    typo, meant = ("kproj", "k_proj") if kind == "llama" else ("c_atn", "c_attn")
    with pytest.raises(ValueError, match=rf"\('{typo}',\) match no module.*close names: .*{meant}"):
        ia3.apply(params, model=model, target_modules=[typo], feedforward_modules=[])
    options = dict(target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="should be a subset"):
        peft.IA3Config(**options)  # peft refuses it too
    with pytest.raises(ValueError, match=r"feedforward_modules \['down_proj'\] are not in"):
        ia3.IA3Config(**options)
    with pytest.raises(ValueError, match="fan_in_fan_out=True is not needed"):
        ia3.IA3Config(fan_in_fan_out=True)
    with pytest.raises(ValueError, match="target_modules must be given: IA3 has defaults"):
        ia3.apply(params)  # no model: no model family
    with pytest.raises(ValueError, match="init_ia3_weights=False .* pass key="):
        ia3.apply(params, model=model, init_ia3_weights=False)
    adapted = ia3.apply(params, model=model)
    with pytest.raises(ValueError, match="already has an IA3 vector"):
        ia3.apply(adapted, model=model)
    first = "model.layers.0.mlp.down_proj" if kind == "llama" else "transformer.h.0.mlp.c_proj"
    with pytest.raises(ValueError, match="make some layers of .* feedforward and others not"):
        ia3.apply(params, model=model, feedforward_modules=re.escape(first))

    # PEFT files that do not fit: a vector of the wrong shape, a key nothing reads.
    out = jpeft.hf.export_peft(_moved(adapted, jax.random.key(0)), tmp_path / "hf")
    path = out / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    key = sorted(tensors)[0]
    safetensors.numpy.save_file({**tensors, key: tensors[key].T.copy()}, path)
    with pytest.raises(jpeft.CheckpointError, match=rf"{re.escape(key)} has shape") as info:
        jpeft.hf.import_peft(params, out)
    assert str(path) in str(info.value)
    stray = key.replace("layers.0", "layers.9").replace("h.0", "h.9")
    safetensors.numpy.save_file({**tensors, stray: tensors[key]}, path)
    with pytest.raises(jpeft.CheckpointError, match=r"match no adapted module.*\.9\."):
        jpeft.hf.import_peft(params, out)
