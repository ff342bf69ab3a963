"""`jpeft merge` of several named adapters: each of peft's combination types as
:func:`jpeft.lora_combination.combine` computes it, written as one adapter or folded into the
model; bad weights, names and densities are usage errors."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import transformers
from cli_fixtures import adapted, adapter_arrays, hf_logits, run, tiny, token_ids  # noqa: F401

import jpeft
from jpeft import checkpoint, cli, lora, lora_combination

pytestmark = pytest.mark.usefixtures("private_compilation_cache")


@pytest.fixture(scope="module")
def two_adapters(tiny, tmp_path_factory):
    """Two random LoRA adapters over the tiny model, one in each format: ``{"x", "y"}``."""
    work = tmp_path_factory.mktemp("two_adapters")
    _, base = jpeft.models.from_pretrained(tiny["model"])
    x = lora.apply(base, rank=4, targets=["q_proj", "v_proj"], init_lora_weights=False,
                   key=jax.random.key(1))  # fmt: skip
    y = lora.apply(base, rank=4, alpha=8, targets=["q_proj", "o_proj"], init_lora_weights=False,
                   key=jax.random.key(2))  # fmt: skip
    checkpoint.save_adapter(x, work / "x")
    jpeft.hf.export_peft(y, work / "y")
    return {"x": work / "x", "y": work / "y"}


def _combined(tiny, two_adapters, weights, **options):
    """What the library makes of the two adapters as the CLI reads them."""
    trees = [adapted(tiny, two_adapters[n])[1] for n in ("x", "y")]
    return lora_combination.combine(trees, weights, **options)


def test_merge_combines_named_adapters_into_one_adapter(tiny, two_adapters, tmp_path):
    x, y = f"x={two_adapters['x']}", f"y={two_adapters['y']}"
    out = tmp_path / "combined"
    code, stdout, stderr = run(
        "merge", tiny["model"], "--adapter", x, "--adapter", y, "--weights", "0.7,-0.3",
        "--combination", "ties", "--density", "0.5", "--out", out,
    )  # fmt: skip
    assert code == 0, stderr
    assert f"ties combination of x, y (weights [0.7, -0.3]) as the jpeft adapter {out}" in stdout
    model, base = jpeft.models.from_pretrained(tiny["model"])
    written = checkpoint.load_adapter(base, out)
    expected = _combined(tiny, two_adapters, [0.7, -0.3], combination_type="ties", density=0.5)
    ours, theirs = adapter_arrays(written), adapter_arrays(expected)
    assert set(ours) == set(theirs) and len(ours) == 3 * 3  # q, v and o, each a, b, scale
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    config = checkpoint.read_adapter_metadata(out)["config"]
    assert config["adapters"] == {"x": str(two_adapters["x"]), "y": str(two_adapters["y"])}
    assert config["density"] == 0.5 and config["base_model_name_or_path"] == str(tiny["model"])
    # Unnamed folders are named after themselves; weights default to 1 each.
    code, stdout, stderr = run(
        "merge", tiny["model"], "--adapter", two_adapters["x"], "--adapter", two_adapters["y"],
        "--combination", "cat", "--out", tmp_path / "cat",
    )  # fmt: skip
    assert code == 0, stderr
    assert "cat combination of x, y (weights [1.0, 1.0])" in stdout


def test_merge_full_folds_a_dare_combination_into_the_model(tiny, two_adapters, tmp_path):
    code, stdout, stderr = run(
        "merge", tiny["model"], "--adapter", f"x={two_adapters['x']}", "--adapter",
        f"y={two_adapters['y']}", "--weights", "0.5,0.5", "--combination", "dare_linear",
        "--density", "0.5", "--seed", "3", "--full", "--out", tmp_path / "merged",
    )  # fmt: skip
    assert code == 0, stderr
    assert "merged" in stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    combined = _combined(tiny, two_adapters, [0.5, 0.5], combination_type="dare_linear",
                         density=0.5, key=jax.random.key(3))  # fmt: skip
    model, _ = jpeft.models.from_pretrained(tiny["model"])
    ids = token_ids(tiny)
    expected = np.asarray(model(lora.merge(combined), ids))
    np.testing.assert_allclose(hf_logits(loaded, ids), expected, rtol=0, atol=1e-4)
    other = _combined(tiny, two_adapters, [0.5, 0.5], combination_type="dare_linear",
                      density=0.5, key=jax.random.key(4))  # fmt: skip
    assert np.abs(np.asarray(model(lora.merge(other), ids)) - expected).max() > 1e-3  # seeded


def test_merge_combination_bad_input_names_the_problem(tiny, two_adapters, tmp_path):
    x, y = f"x={two_adapters['x']}", f"y={two_adapters['y']}"
    model, out = tiny["model"], tmp_path / "out"
    cases = [
        (["--adapter", x, "--adapter", y, "--weights", "0.7"], "--weights 0.7: 1 weights for 2"),
        (["--adapter", x, "--adapter", y, "--weights", "a,b"], "expected numbers separated"),
        (["--adapter", x, "--adapter", f"x={two_adapters['y']}"], "two adapters are named 'x'"),
        (["--adapter", x, "--density", "0.5"], "--density apply only when combining adapters"),
        (["--adapter", x, "--adapter", y, "--combination", "ties"],
         f"needs density in \\[0, 1\\] \\(adapter 0 is {re.escape(x)}, 1 is {re.escape(y)}\\)"),
        (["--adapter", "x="], "expected NAME=DIR"),
    ]  # fmt: skip
    for argv, message in cases:
        code, _, stderr = run("merge", model, *argv, "--out", out)
        assert code == cli.EXIT_BAD_INPUT, argv
        assert re.search(message, stderr), (argv, stderr)
    assert not out.exists()


def test_named_adapter_specs():
    from jpeft.cli import common

    assert common.parse_named_adapter("math=out/math") == ("math", "out/math")
    assert common.parse_named_adapter("out/run/adapter") == (None, "out/run/adapter")
    assert common.parse_named_adapter("out/lr=1e-3/adapter") == (None, "out/lr=1e-3/adapter")
    assert common.named_adapters(["a=one/adapter", "two/adapter"]) == {
        "a": "one/adapter",
        "adapter": "two/adapter",
    }
