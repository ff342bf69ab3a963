"""The ``jpeft`` command line, run in-process through ``jpeft.cli.main`` on a tiny random
Llama with a tiny byte-level BPE tokenizer (real transformers tokenizer and chat template,
from :mod:`cli_fixtures`): one training run that the later tests inspect and build on
(resume, NaN guard, generate, merge, export and import, inspect)."""

from __future__ import annotations

import json
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from cli_fixtures import (  # noqa: F401  (tiny is a fixture)
    BAD_ROW,
    TRAIN_STEPS,
    adapted,
    adapter_arrays,
    hf_logits,
    run,
    tiny,
    token_ids,
    train_args,
)

import jpeft
from jpeft import checkpoint, cli, lora, train, train_state, trainer
from jpeft.hf import peft_format


pytestmark = [
    pytest.mark.usefixtures("private_compilation_cache"),
    pytest.mark.xdist_group("test_cli"),  # one worker builds the `trained` run
]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One ``jpeft train`` run that the later tests inspect and build on."""
    work = tmp_path_factory.mktemp("trained")
    out = work / "run"
    code, stdout, stderr = run(*train_args(tiny, work, out))
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "stderr": stderr, "work": work}


# ----------------------------------------------------------------------------- train


def test_train_writes_everything_and_the_loss_falls(trained, tiny):
    out, stdout = trained["out"], trained["stdout"]
    for name in ("metrics.jsonl", "loss.png", "adapter", "hf_adapter", "checkpoints"):
        assert (out / name).exists(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "hf_adapter" / peft_format.WEIGHTS_FILE).is_file()

    # The bad row is reported with its row number, the others are used.
    assert f"row {BAD_ROW}: no assistant message" in stdout
    assert f"15 examples from 16 rows of {tiny['data']}, 1 bad row skipped" in stdout
    assert "trainable params: " in stdout and "trainable%: " in stdout
    assert "eval split: 4 of the examples held out, 11 left for training" in stdout
    for line in ("adapter (jpeft, Orbax):", "adapter (Hugging Face PEFT):", "loss plot:"):
        assert line in stdout

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, TRAIN_STEPS + 1))  # the CLI override
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]

    # Options from the config file took effect: rank 4, every linear layer, alpha 8.
    metadata = checkpoint.read_adapter_metadata(out / "adapter")
    assert metadata["config"]["r"] == 4 and metadata["config"]["lora_alpha"] == 8
    assert {e["arrays"]["a"]["shape"][-1] for e in metadata["entries"]} == {4}
    assert len(metadata["entries"]) == 7  # q, k, v, o, gate, up, down
    hf_config = json.loads((out / "hf_adapter" / peft_format.CONFIG_FILE).read_text())
    assert hf_config["r"] == 4 and hf_config["lora_alpha"] == 8
    assert hf_config["base_model_name_or_path"] == str(tiny["model"])


def _stop_during_step(monkeypatch, call: int) -> None:
    """Sends a real SIGINT (Ctrl-C) while the `call`-th train step runs."""
    real = train.make_train_step

    def make(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def counted(*step_args):
            calls.append(1)
            if len(calls) == call:
                signal.raise_signal(signal.SIGINT)
            return step(*step_args)

        return counted

    monkeypatch.setattr(train, "make_train_step", make)


def test_ctrl_c_saves_then_resume_finishes_the_same_run(trained, tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = train_args(tiny, tmp_path, out)
    _stop_during_step(monkeypatch, 7)
    code, _, stderr = run(*args)
    monkeypatch.undo()
    assert code == cli.EXIT_INTERRUPTED == 130
    assert "Traceback" not in stderr
    assert f"the train state is saved at step 7 in {out / 'checkpoints'}" in stderr
    assert "--resume" in stderr
    assert train_state.latest_step(out / "checkpoints") == 7

    # Starting again without --resume would lose the saved state: refused.
    code, _, stderr = run(*args)
    assert code == 2 and stderr.startswith("jpeft: error:") and "--resume" in stderr

    code, stdout, stderr = run(*args, "--resume")
    assert code == 0, stderr
    assert "resuming from step 7" in stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TRAIN_STEPS + 1))
    # Bitwise the adapter of the run that was never stopped.
    model, base = jpeft.models.from_pretrained(tiny["model"])
    resumed = adapter_arrays(checkpoint.load_adapter(base, out / "adapter"))
    straight = adapter_arrays(checkpoint.load_adapter(base, trained["out"] / "adapter"))
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_nan_loss_is_an_error_and_keeps_the_last_train_state(tiny, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = run(
        "train",
        tiny["model"],
        "--data",
        tiny["data"],
        "--out",
        out,
        "--lr",
        "1e38",
        "--warmup-steps",
        "0",
        "--batch-size",
        "4",
        "--save-every",
        "1",
        "--max-steps",
        "5",
        "--no-progress",
    )
    assert code == cli.EXIT_FAILED
    assert "Traceback" not in stderr
    assert re.match(
        r"jpeft: error: loss is (nan|inf) at step 2; the train state saved at "
        f"step 1 in {re.escape(str(out / 'checkpoints'))} is intact",
        stderr,
    ), stderr
    assert train_state.latest_step(out / "checkpoints") == 1
    # That train state is loadable, and finite.
    model, base = jpeft.models.from_pretrained(tiny["model"])
    params = lora.apply(base, rank=8, key=jax.random.key(0))
    trainable, _ = jpeft.split(params)
    optimizer = trainer.TrainConfig(learning_rate=1e38, warmup_steps=0).optimizer(5)
    state = train_state.restore_train_state(
        out / "checkpoints", params=trainable, opt_state_like=optimizer.init(trainable)
    )
    assert state.step == 1
    leaves = jax.tree.leaves(state.params)
    assert leaves and all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert not (out / "adapter").exists()


# ----------------------------------------------------------------------------- generate


def test_generate_with_and_without_an_adapter(trained, tiny):
    prompt = ["--prompt", "where is the fox", "where is the owl", "--chat", "--max-new-tokens", "8"]
    code, base_out, stderr = run("generate", tiny["model"], *prompt)
    assert code == 0, stderr
    code, tuned_out, stderr = run(
        "generate", tiny["model"], "--adapter", trained["out"] / "adapter", *prompt
    )
    assert code == 0, stderr
    code, hf_out, stderr = run(
        "generate", tiny["model"], "--adapter", trained["out"] / "hf_adapter", *prompt
    )
    assert code == 0, stderr
    assert hf_out == tuned_out != base_out
    assert "--- prompt 2: where is the owl" in tuned_out

    # The same text as the library gives.
    model, params = adapted(tiny, trained["out"] / "adapter")
    tokenizer = jpeft.models.load_tokenizer(tiny["model"])
    chats = [[{"role": "user", "content": p}] for p in ("where is the fox", "where is the owl")]
    answers = jpeft.generate(model, params, tokenizer, chats, max_new_tokens=8)
    assert tuned_out.splitlines() == [
        "--- prompt 1: where is the fox",
        answers[0],
        "--- prompt 2: where is the owl",
        answers[1],
    ]
    assert all(a.endswith("the mat") for a in answers)  # it learnt the replies


# ----------------------------------------------------------------------------- merge


def test_merge_writes_a_folder_transformers_loads(trained, tiny, tmp_path):
    code, stdout, stderr = run(
        "merge",
        tiny["model"],
        "--adapter",
        trained["out"] / "adapter",
        "--out",
        tmp_path / "merged",
    )
    assert code == 0, stderr
    assert "merged" in stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    model, params = adapted(tiny, trained["out"] / "adapter")
    ids = token_ids(tiny)
    expected = np.asarray(model(lora.merge(params), ids))
    np.testing.assert_allclose(hf_logits(loaded, ids), expected, rtol=0, atol=1e-4)
    # The adapter changed the model, and the tokenizer came along.
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    assert np.abs(hf_logits(base, ids) - expected).max() > 1e-2
    merged = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    original = jpeft.models.load_tokenizer(tiny["model"])
    text = "where is the fox"
    assert merged(text)["input_ids"] == original(text)["input_ids"]
    assert merged.chat_template == original.chat_template


def test_merge_from_gguf(trained, tiny, tmp_path):
    from test_gguf import _convert  # llama.cpp's converter, re-implemented for the tests

    source = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    gguf_file = tmp_path / "tiny.gguf"
    _convert(source, "llama", gguf_file)
    code, _, stderr = run(
        "merge", gguf_file, "--adapter", trained["out"] / "hf_adapter", "--out", tmp_path / "merged"
    )
    assert code == 0, stderr
    assert "no tokenizer" in stderr  # the test file holds no usable tokenizer
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    model, base = jpeft.models.from_pretrained(gguf_file)
    params = peft_format.import_peft(base, trained["out"] / "hf_adapter")
    ids = token_ids(tiny)
    np.testing.assert_allclose(
        hf_logits(loaded, ids), np.asarray(model(lora.merge(params), ids)), rtol=0, atol=1e-4
    )


# ----------------------------------------------------------------------------- export / import


def test_export_hf_loads_in_peft(trained, tiny, tmp_path):
    code, stdout, stderr = run(
        "export-hf",
        tiny["model"],
        "--adapter",
        trained["out"] / "adapter",
        "--out",
        tmp_path / "hf",
    )
    assert code == 0, stderr
    assert peft_format.CONFIG_FILE in stdout
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "hf").eval()
    model, params = adapted(tiny, trained["out"] / "adapter")
    ids = token_ids(tiny)
    np.testing.assert_allclose(
        hf_logits(peft_model, ids), np.asarray(model(params, ids)), rtol=0, atol=1e-4
    )
    config = json.loads((tmp_path / "hf" / peft_format.CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == str(tiny["model"])  # recorded at training


def test_import_hf_round_trip(trained, tiny, tmp_path):
    code, stdout, stderr = run(
        "import-hf",
        tiny["model"],
        "--adapter",
        trained["out"] / "hf_adapter",
        "--out",
        tmp_path / "imported",
    )
    assert code == 0, stderr
    _, imported = adapted(tiny, tmp_path / "imported")
    _, original = adapted(tiny, trained["out"] / "adapter")
    imported, original = adapter_arrays(imported), adapter_arrays(original)
    assert imported.keys() == original.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(imported[name], value, err_msg=name)
    config = checkpoint.read_adapter_metadata(tmp_path / "imported")["config"]
    assert config["peft_type"] == "LORA" and config["r"] == 4
    # And back: the same HF tensors.
    code, _, stderr = run(
        "export-hf", tiny["model"], "--adapter", tmp_path / "imported", "--out", tmp_path / "again"
    )
    assert code == 0, stderr
    import safetensors.numpy

    first = safetensors.numpy.load_file(trained["out"] / "hf_adapter" / peft_format.WEIGHTS_FILE)
    again = safetensors.numpy.load_file(tmp_path / "again" / peft_format.WEIGHTS_FILE)
    assert first.keys() == again.keys()
    for key, value in first.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


# ----------------------------------------------------------------------------- inspect


def _inspect_json(path):
    code, stdout, stderr = run("inspect", path, "--json")
    assert code == 0, stderr
    return json.loads(stdout)


def test_inspect_each_kind_of_path(trained, tiny, tmp_path):
    out = trained["out"]
    model, params = adapted(tiny, out / "adapter")
    trainable = jpeft.count_parameters(params)[0]

    info = _inspect_json(out / "adapter")
    assert info["type"] == "jpeft adapter" and info["parameters"] == trainable
    assert info["config"]["r"] == 4 and len(info["entries"]) == 7
    q = next(e for e in info["entries"] if e["path"].endswith("q_proj.weight"))
    assert q["arrays"]["a"]["shape"] == [2, 32, 4] and q["kind"] == "lora"
    assert q["parameters"] == 2 * (32 * 4 + 4 * 32)  # two layers of A [32, 4] and B [4, 32]

    info = _inspect_json(out / "hf_adapter")
    assert info["type"] == "Hugging Face PEFT adapter" and info["parameters"] == trainable
    assert info["tensor_count"] == 2 * 7 * 2
    assert info["tensors"]["base_model.model.model.layers.*.self_attn.q_proj.lora_A.weight"] == {
        "shape": [4, 32],
        "dtype": "F32",
        "count": 2,
    }

    info = _inspect_json(out / "checkpoints")
    assert info["type"] == "jpeft train state" and info["latest_step"] == TRAIN_STEPS
    assert info["trainable_parameters"] == trainable and info["optimizer_state_values"] > 0

    info = _inspect_json(out)
    assert info["type"] == "jpeft train output" and info["steps_logged"] == TRAIN_STEPS
    assert info["adapter"]["parameters"] == trainable

    info = _inspect_json(tiny["model"])
    assert info["type"] == "Hugging Face model folder"
    assert info["parameters"] == jpeft.count_parameters(params)[1] - trainable
    assert info["config"]["model_type"] == "llama" and "tokenizer.json" in info["tokenizer"]
    assert info["tensors"]["model.layers.*.mlp.up_proj.weight"]["shape"] == [64, 32]

    from test_gguf import _convert

    _convert(
        transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]),
        "llama",
        tmp_path / "tiny.gguf",
    )
    info = _inspect_json(tmp_path / "tiny.gguf")
    assert info["type"] == "GGUF file" and info["architecture"] == "llama"
    assert info["parameters"] == jpeft.count_parameters(params)[1] - trainable
    assert set(info["tensor_types"]) == {"F32", "Q8_0"}
    assert info["metadata"]["llama.block_count"] == 2

    # The text form names the same things.
    code, text, _ = run("inspect", out / "adapter")
    assert code == 0
    assert "type: jpeft adapter" in text and f"parameters: {trainable:,d}" in text
    assert "model.layers.self_attn.q_proj.weight  lora  a [2, 32, 4] float32" in text
    code, text, _ = run("inspect", tmp_path / "tiny.gguf")
    assert code == 0 and "blk.*.attn_q.weight" in text and "x2" in text
