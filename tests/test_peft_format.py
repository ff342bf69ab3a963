"""HF PEFT interop, proven by loading into the real `peft` library and back."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import contract
import hf_models
import jpeft
from jpeft import lora

LOGITS_TOLERANCE = 1e-4  # float32: the same factors, torch vs XLA summation order
MERGE_TOLERANCE = 1e-5  # float32: W + s·B@A folded by peft vs by jpeft


def _trained(kind, folder, **options):
    hf_models.make(kind, folder)
    model, params = jpeft.models.from_pretrained(folder)
    adapted = lora.apply(params, key=jax.random.key(0), **options)
    trained, _, _ = contract.run_steps(model, adapted, contract.batch(97), steps=3)
    return model, params, trained


def _peft_logits(peft_model, data):
    return hf_models.hf_logits(peft_model, data["input_ids"], data["attention_mask"])


@pytest.mark.parametrize("kind,options", [
    ("llama", {"rank": 4, "targets": ["q_proj", "v_proj"]}),
    ("llama", {"rank": 4, "alpha": 16, "targets": "all-linear", "use_rslora": True,
               "layers_to_transform": [1]}),
    ("qwen2", {"rank": 2, "targets": ["k_proj", "down_proj"], "bias": "lora_only",
               "rank_pattern": {"down_proj": 3}, "alpha_pattern": {"k_proj": 5}}),
    ("gpt2", {"rank": 4, "targets": ["c_attn", "attn.c_proj"], "bias": "all"}),
    ("gpt2", {"rank": 2, "targets": ["c_fc"], "modules_to_save": ["ln_f"]}),
    ("llama", {"rank": 2, "targets": ["q_proj"], "modules_to_save": ["lm_head"]}),  # [v, d]
])
def test_export_loads_in_peft_with_equal_logits_and_merge(kind, options, tmp_path):
    model, _, trained = _trained(kind, tmp_path / "base", **options)
    out = jpeft.hf.export_peft(trained, tmp_path / "adapter",
                             base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    state = peft.get_peft_model_state_dict(peft_model)
    saved = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    assert set(state) == set(saved)  # no missing or unexpected keys
    for key, value in saved.items():
        np.testing.assert_array_equal(state[key].numpy(), value)
    data = contract.batch(97)
    valid = data["attention_mask"].astype(bool)
    ours = np.asarray(model(trained, data["input_ids"], attention_mask=data["attention_mask"]))
    np.testing.assert_allclose(ours[valid], _peft_logits(peft_model, data)[valid],
                               atol=LOGITS_TOLERANCE)
    merged = peft_model.merge_and_unload().state_dict()
    ours_merged = jpeft.models.to_hf_state_dict(model, lora.merge(trained))
    for key, value in ours_merged.items():
        np.testing.assert_allclose(value, merged[key].numpy(), atol=MERGE_TOLERANCE, err_msg=key)


@pytest.mark.parametrize("kind,config", [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                   rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True,
                   layers_to_transform=[0])),
    ("llama", dict(r=3, lora_alpha=6, target_modules=r".*\.mlp\.(up|down)_proj")),
    ("gpt2", dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ("mistral", dict(r=2, lora_alpha=2, target_modules="all-linear", bias="all")),
])
def test_import_of_a_peft_adapter_and_export_round_trip(kind, config, tmp_path):
    hf = hf_models.make(kind, tmp_path / "base")
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # non-zero B and biases that differ from the base
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.eval().save_pretrained(tmp_path / "peft")
    model, params = jpeft.models.from_pretrained(tmp_path / "base")
    ours = jpeft.hf.import_peft(params, tmp_path / "peft")
    data = contract.batch(97)
    valid = data["attention_mask"].astype(bool)
    out = np.asarray(model(ours, data["input_ids"], attention_mask=data["attention_mask"]))
    np.testing.assert_allclose(out[valid], _peft_logits(peft_model, data)[valid],
                               atol=LOGITS_TOLERANCE)
    again = jpeft.hf.export_peft(ours, tmp_path / "again")
    before = safetensors.numpy.load_file(tmp_path / "peft" / "adapter_model.safetensors")
    after = safetensors.numpy.load_file(again / "adapter_model.safetensors")
    assert set(before) == set(after)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])


def test_real_model_export_loads_in_peft(smollm2_file, smollm2_transformers, tmp_path):
    model, params = jpeft.models.from_pretrained(smollm2_file)
    adapted = lora.apply(params, rank=4, targets=["q_proj", "v_proj"], key=jax.random.key(0),
                         init_lora_weights=False)
    # B ~ U(±1/√r) would swamp the model; a small update keeps the comparison about layout.
    adapted = jpeft.tree.map_nodes(
        lambda _, x: dataclasses.replace(x, b=0.05 * x.b) if isinstance(x, lora.LoraWeight) else x,
        adapted)
    out = jpeft.hf.export_peft(adapted, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_transformers, dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    ids = np.asarray(jpeft.models.load_tokenizer(smollm2_file)(
        ["Adapters travel between JAX and PyTorch."])["input_ids"], np.int32)
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(adapted, ids)), expected, atol=1e-3)


def test_trained_adapter_continues_in_jpeft_after_a_round_trip(tmp_path):
    model, params, trained = _trained("llama", tmp_path / "base", rank=4, targets=["q_proj"])
    folder = jpeft.hf.export_peft(trained, tmp_path / "adapter")
    back = jpeft.hf.import_peft(params, folder)
    ids = contract.batch(97)["input_ids"]
    np.testing.assert_array_equal(np.asarray(model(back, ids)), np.asarray(model(trained, ids)))
    assert jax.tree.structure(back) == jax.tree.structure(trained)


def _adapter(tmp_path):
    hf = hf_models.make("llama", tmp_path / "base")
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "peft")
    return jpeft.models.from_pretrained(tmp_path / "base")[1], tmp_path / "peft"


def test_bad_adapters_fail_with_the_problem_and_the_file(tmp_path):
    params, folder = _adapter(tmp_path)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())

    def fails(match, **changes):
        config_path.write_text(json.dumps({**config, **changes}))
        with pytest.raises(jpeft.CheckpointError, match=match):
            jpeft.hf.import_peft(params, folder)

    fails("peft_type 'LOHA' is not implemented", peft_type="LOHA")
    fails("lora_bias=True is not supported", lora_bias=True)
    fails("pissa.*modified base", init_lora_weights="pissa")
    fails("does not fit the base model.*match no module", target_modules=["nope_proj"])
    fails("has shape", r=3)
    fails("match no adapted module", layers_to_transform=[0])
    config_path.write_text("{not json")
    with pytest.raises(jpeft.CheckpointError, match="adapter_config.json is not valid JSON"):
        jpeft.hf.import_peft(params, folder)
    config_path.write_text(json.dumps({"r": 2}))
    with pytest.raises(jpeft.CheckpointError, match="no peft_type"):
        jpeft.hf.import_peft(params, folder)
    config_path.unlink()
    with pytest.raises(jpeft.CheckpointError, match="has no adapter_config.json"):
        jpeft.hf.import_peft(params, folder)


def test_export_without_adapter_fails(tmp_path):
    with pytest.raises(ValueError, match="no adapter to export"):
        jpeft.hf.export_peft({"w": {"weight": jnp.zeros((2, 2))}}, tmp_path)
