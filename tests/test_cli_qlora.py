"""`jpeft train --quantize`: QLoRA from the command line, and the adapter it trains used by
`generate`, `merge` and `export-hf`."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from cli_fixtures import run, tiny, train_args  # noqa: F401  (tiny is a fixture)

import jpeft
from jpeft import lora, qlora
from jpeft.quant import nf4

pytestmark = pytest.mark.usefixtures("private_compilation_cache")


def _factors(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jpeft.tree.extract(params))]


@pytest.fixture(scope="module")
def quantized_run(tiny, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("qlora")
    out = work / "run"
    code, stdout, stderr = run(
        *train_args(tiny, work, out), "--quantize", "nf4", "--block-size", "32"
    )
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "work": work}


def test_train_quantizes_the_base_and_trains_the_adapter_over_it(tiny, quantized_run):  # noqa: F811
    out = quantized_run["out"]
    # 2 layers x 7 linears; the head stays float, as in transformers' BitsAndBytesConfig
    assert (
        "quantised 14 linear weights to nf4 (block size 32 with double quantisation)"
        in (quantized_run["stdout"])
    )
    model, base = qlora.from_pretrained(tiny["model"], block_size=32, compute_dtype=jnp.float32)
    adapted = jpeft.load_adapter(base, out / "adapter")  # fits the 4-bit base
    q_proj = adapted["model"]["layers"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(q_proj, lora.LoraWeight) and isinstance(q_proj.w, nf4.NF4Weight)
    # the same run over the float base ends elsewhere: the 4-bit base was what trained
    float_out = quantized_run["work"] / "float"
    code, _, stderr = run(*train_args(tiny, quantized_run["work"], float_out))
    assert code == 0, stderr
    _, float_base = jpeft.models.from_pretrained(tiny["model"])
    float_adapted = jpeft.load_adapter(float_base, float_out / "adapter")
    quantized, plain = _factors(adapted), _factors(float_adapted)
    assert len(quantized) == len(plain)
    assert max(np.abs(a - b).max() for a, b in zip(quantized, plain, strict=True)) > 1e-4


def test_generate_merge_and_export_take_the_quantized_runs_adapter(tiny, quantized_run):  # noqa: F811
    adapter, work = quantized_run["out"] / "adapter", quantized_run["work"]
    code, stdout, stderr = run(
        "generate",
        tiny["model"],
        "--adapter",
        adapter,
        "--chat",
        "--prompt",
        "where is the cat",
        "--max-new-tokens",
        "4",
    )
    assert code == 0, stderr
    assert stdout.strip()
    code, _, stderr = run("merge", tiny["model"], "--adapter", adapter, "--out", work / "merged")
    assert code == 0, stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(work / "merged")
    code, _, stderr = run("export-hf", tiny["model"], "--adapter", adapter, "--out", work / "hf")
    assert code == 0, stderr
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"])
    with_adapter = peft.PeftModel.from_pretrained(base, work / "hf").eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():  # the merged folder is the float base with the adapter folded in
        np.testing.assert_allclose(
            merged(ids).logits.numpy(), with_adapter(ids).logits.numpy(), atol=1e-4
        )


def test_bad_quantization_options_are_named(tiny, tmp_path):  # noqa: F811
    code, _, stderr = run(
        *train_args(tiny, tmp_path, tmp_path / "run"), "--quantize", "nf4", "--block-size", "48"
    )
    assert code == 2
    assert "block size 48 is not supported" in stderr
    code, _, stderr = run(*train_args(tiny, tmp_path, tmp_path / "run"), "--quantize", "int4")
    assert code == 2 and "invalid choice: 'int4'" in stderr


def test_smollm2_trains_over_an_nf4_base_and_generates_with_the_adapter(smollm2_file, tmp_path):
    data = Path(__file__).resolve().parent.parent / "data" / "people_json" / "train.jsonl"
    out = tmp_path / "run"
    code, stdout, stderr = run(
        "train",
        smollm2_file,
        "--data",
        data,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "128",
        "--quantize",
        "nf4",
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, stderr
    assert "quantised 210 linear weights to nf4 (block size 64 with double quantisation)" in stdout
    code, stdout, stderr = run(
        "generate",
        smollm2_file,
        "--adapter",
        out / "adapter",
        "--chat",
        "--prompt",
        "Extract the person as JSON: Ana Lima, 31, nurse.",
        "--max-new-tokens",
        "4",
    )
    assert code == 0, stderr
    assert stdout.strip().startswith("{")
