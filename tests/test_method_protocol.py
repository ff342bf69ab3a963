"""The node protocol: a new PEFT method defined entirely in this file, with no change to
jpeft, trains, saves and loads, merges and counts like LoRA does; nodes jpeft does not know
fail with errors that name them.

The method: a learned per-output-channel scale of a linear weight, ``y = (x @ w) * s``,
``s: [..., out]`` starting at one (an identity, like (IA)³ on a weight).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import contract
import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import nn, tree
from jpeft import targets as targeting


@tree.node
class ChannelScale(tree.Node):
    w: Any
    s: jax.Array

    kind: ClassVar[str] = "test_channel_scale"
    trainable_fields: ClassVar[tuple[str, ...]] = ("s",)
    base_field: ClassVar[str] = "w"

    def adapted_shape(self) -> tuple[int, ...]:
        return (*self.s.shape[:-1], -1, self.s.shape[-1])

    def parameter_count(self) -> tuple[int, int]:
        return self.s.size, tree.count_parameters(self.w)[1] + self.s.size


nn.register("linear", ChannelScale)(lambda x, node: nn.linear(x, node.w) * node.s.astype(x.dtype))
nn.register("value", ChannelScale)(lambda node: nn.value(node.w) * node.s[..., None, :])


def add_channel_scales(params, key=None, targets=("q_proj", "v_proj")):
    new = tree.copy_dicts(params)
    for module, _ in targeting.select(params, list(targets)):
        entry = tree.get_path(new, module.path)
        weight = entry[module.weight_key]
        shape = nn.shape(weight)
        entry[module.weight_key] = ChannelScale(w=weight, s=jnp.ones((*shape[:-2], shape[-1])))
    return new


def merge(params):
    return tree.materialize(params)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_models.make(request.param, folder, initializer_range=contract.INIT_STD)
    model, params = jpeft.models.from_pretrained(folder)
    return request.param, model, params


def _targets(kind):
    return ("c_attn",) if kind == "gpt2" else ("q_proj", "v_proj")


def test_a_method_defined_outside_jpeft_passes_the_contract(tiny, tmp_path):
    kind, model, params = tiny

    def add(p, key):
        return add_channel_scales(p, key, _targets(kind))

    trained = contract.check_all(
        model, params, add, merge, contract.batch(97), [".s"], tmp_path / "adapter"
    )
    scales = [x for _, x in tree.iter_nodes(trained) if isinstance(x, ChannelScale)]
    assert scales and all(not np.allclose(np.asarray(x.s), 1) for x in scales)
    saved = json.loads((tmp_path / "adapter" / jpeft.checkpoint.METADATA_FILE).read_text())
    assert {e["type"] for e in saved["entries"]} == {"test_channel_scale"}
    assert all(set(e["arrays"]) == {"s"} for e in saved["entries"])  # no base weight saved


def test_counts_and_extract_attach_go_through_the_protocol(tiny):
    kind, _, params = tiny
    adapted = add_channel_scales(params, targets=_targets(kind))
    scales = [x for _, x in tree.iter_nodes(adapted) if isinstance(x, ChannelScale)]
    expected = sum(x.s.size for x in scales)
    assert jpeft.count_parameters(adapted) == (
        expected,
        jpeft.count_parameters(params)[1] + expected,
    )
    adapter = tree.extract(adapted)
    assert all(x.w is None for _, x in tree.iter_nodes(adapter))
    back = tree.attach(params, adapter)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(adapted), strict=True):
        assert got is want
    narrow = jax.tree.map(lambda x: x[..., :3], adapter)
    with pytest.raises(ValueError, match=r"fits a weight of shape .*-1, 3\), but the base has"):
        tree.attach(params, narrow)


@tree.node
class Unruled(tree.Node):
    """A node no rule was registered for."""

    w: Any
    kind: ClassVar[str] = "test_unruled"
    base_field: ClassVar[str] = "w"


def test_a_node_without_rules_is_named_by_every_op():
    node = Unruled(w=jnp.ones((4, 3)))
    x = jnp.ones((2, 4))
    for call in (
        lambda: nn.linear(x, node),
        lambda: nn.value(node),
        lambda: nn.embed(jnp.zeros(2, int), node),
        lambda: nn.attend(x, node),
    ):
        with pytest.raises(TypeError, match="got a Unruled, which is not an array and has no"):
            call()
    with pytest.raises(TypeError, match=r"Unruled \(test_unruled\) does not fold into the base"):
        tree.materialize({"layer": {"weight": node}})


def test_a_node_with_only_a_value_rule_computes_every_op_from_it():
    @tree.node
    class Doubled(tree.Node):
        w: Any

    nn.register("value", Doubled)(lambda node: 2 * node.w)
    w = jnp.arange(12.0).reshape(4, 3)
    x = jnp.ones((2, 4))
    np.testing.assert_array_equal(nn.linear(x, Doubled(w=w)), x @ (2 * w))
    np.testing.assert_array_equal(nn.embed(jnp.array([1]), Doubled(w=w)), 2 * w[1:2])


def test_a_checkpoint_of_an_unknown_kind_is_refused_by_name(tiny, tmp_path):
    kind, _, params = tiny
    jpeft.save_adapter(add_channel_scales(params, targets=_targets(kind)), tmp_path)
    path = tmp_path / jpeft.checkpoint.METADATA_FILE
    saved = json.loads(path.read_text())
    saved["entries"][0]["type"] = "ia4"
    path.write_text(json.dumps(saved))
    with pytest.raises(
        jpeft.hf.CheckpointError,
        match=r"unknown adapter node kind 'ia4'.*"
        r"'lora'.*'test_channel_scale'.*'trainable'",
    ):
        jpeft.load_adapter(params, tmp_path)


def test_kinds_are_unique():
    with pytest.raises(ValueError, match="node kind 'lora' is taken by LoraWeight"):

        @dataclasses.dataclass(frozen=True)
        class Impostor(tree.Node):
            kind: ClassVar[str] = "lora"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChannelScaleConfig:
    target_modules: tuple[str, ...] = dataclasses.field(
        default=("q_proj", "v_proj"),
        metadata={"help": "modules to scale", "flag": "--targets", "parse": targeting.parse_names},
    )
    init: float = dataclasses.field(default=1.0, metadata={"help": "initial scale"})


def apply_channel_scales(params, *, config, key, model):
    scaled = add_channel_scales(params, key, config.target_modules)
    return jax.tree.map(
        lambda x: dataclasses.replace(x, s=x.s * config.init) if isinstance(x, ChannelScale) else x,
        scaled,
        is_leaf=lambda x: isinstance(x, ChannelScale),
    )


@pytest.fixture
def registered():
    """The test method in the registry, as its own file would register it."""
    return jpeft.methods.register(
        jpeft.methods.Method(
            name="test_channel_scale",
            title="channel scale",
            config_class=ChannelScaleConfig,
            apply=apply_channel_scales,
        )
    )


def test_the_cli_trains_a_registered_method_it_does_not_know(registered, tmp_path, capsys):
    import cli_fixtures

    from jpeft import cli

    tiny = cli_fixtures.make_tiny_chat_model(tmp_path)
    model_dir, data = tiny["model"], tiny["data"]

    assert cli.main(["train", "--method", registered.name, "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "method (channel scale)" in help_text and "--init" in help_text
    assert "--rank R" not in help_text and "--rslora" not in help_text  # LoRA's own

    out = tmp_path / "run"
    argv = ["train", model_dir, "--method", registered.name, "--data", data, "--out", out]
    code = cli.main(
        [
            str(a)
            for a in (
                *argv,
                "--targets",
                "q_proj",
                "--init",
                "2",
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--no-progress",
            )
        ]
    )
    assert code == 0, capsys.readouterr().err
    metadata = jpeft.checkpoint.read_adapter_metadata(out / "adapter")
    assert {e["type"] for e in metadata["entries"]} == {"test_channel_scale"}
    assert metadata["config"]["method"] == registered.name
    assert metadata["config"]["target_modules"] == ["q_proj"] and metadata["config"]["init"] == 2
    _, base = jpeft.models.from_pretrained(model_dir)
    loaded = jpeft.load_adapter(base, out / "adapter")
    (scale,) = [x for _, x in tree.iter_nodes(loaded) if isinstance(x, ChannelScale)]
    assert scale.s.shape == (2, 32) and not np.allclose(np.asarray(scale.s), 2)  # it trained
    assert not (out / "hf_adapter").exists()  # HF PEFT has no such method
    assert cli.main(["inspect", str(out / "adapter")]) == 0
    assert "test_channel_scale" in capsys.readouterr().out
