"""Every registered PEFT method passes the contract suite with its default config, and the
registry refuses what it cannot hold."""

from __future__ import annotations

import dataclasses
import json

import contract
import hf_models
import pytest

import jpeft
from jpeft import methods, tree


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_models.make(request.param, folder, initializer_range=contract.INIT_STD)
    return jpeft.models.from_pretrained(folder)


@pytest.mark.parametrize("name", methods.names())
def test_every_registered_method_passes_the_contract(name, tiny, tmp_path):
    method = methods.get(name)
    model, params = tiny
    config = method.config_class()

    def add(p, key):
        return method.apply(p, config=config, key=key, model=model)

    trained = contract.check_all(
        model, params, add, tree.materialize, contract.batch(97), None, tmp_path / "adapter",
        identity=method.identity_at_init,
    )  # fmt: skip
    saved = jpeft.checkpoint.read_adapter_metadata(tmp_path / "adapter")
    nodes = {keys: x for keys, x in tree.iter_nodes(tree.extract(trained))}
    assert {tuple(e["path"]): e["type"] for e in saved["entries"]} == {
        keys: x.kind for keys, x in nodes.items()
    }


def test_builtin_methods_are_registered():
    assert {"lora", "prompt", "prefix", "ia3", "bottleneck"} <= set(methods.names())
    assert methods.with_peft_type("IA3") is methods.get("ia3")
    assert methods.with_peft_type("PREFIX_TUNING") is methods.get("prefix")
    lora = methods.get("lora")
    assert lora.config_class is jpeft.lora.LoraConfig and lora.peft_type == "LORA"
    config = lora.adapter_config(
        lora.config_class(r=4, target_modules=("q_proj",)), base_model_name_or_path="m"
    )
    assert json.loads(json.dumps(config)) == config  # JSON-ready as it is
    assert config["method"] == "lora" and config["peft_type"] == "LORA"
    assert config["r"] == 4 and config["target_modules"] == ["q_proj"]
    assert config["base_model_name_or_path"] == "m"


def test_unknown_and_clashing_methods_are_refused():
    with pytest.raises(ValueError, match=r"unknown PEFT method 'ia4'; registered: .*lora"):
        methods.get("ia4")

    @dataclasses.dataclass(frozen=True)
    class OtherConfig:
        pass

    with pytest.raises(ValueError, match="method name 'lora' is taken by LoRA"):
        methods.register(methods.Method("lora", "Other", OtherConfig, lambda p, **k: p))
