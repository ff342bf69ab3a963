"""The ``jpeft`` command line, run in-process through ``jpeft.cli.main`` on a tiny random
Llama with a tiny byte-level BPE tokenizer (real transformers tokenizer and chat template)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jpeft
from jpeft import checkpoint, cli, lora, lora_combination, train, train_state, trainer
from jpeft.hf import peft_format

ANIMALS = [
    "cat",
    "dog",
    "fox",
    "owl",
    "bee",
    "cow",
    "pig",
    "rat",
    "hen",
    "elk",
    "ant",
    "bat",
    "yak",
    "emu",
    "eel",
    "ram",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BAD_ROW = 3  # a chat without an assistant turn


pytestmark = [
    pytest.mark.usefixtures("private_compilation_cache"),
    pytest.mark.xdist_group("test_cli"),  # one worker builds the `trained` run
]


def _rows() -> list[dict]:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"where is the {a}"},
                {"role": "assistant", "content": f"the {a} sat on the mat"},
            ]
        }
        for a in ANIMALS
    ]
    rows[BAD_ROW] = {"messages": [{"role": "user", "content": "where is the cat"}]}
    return rows


def _tokenizer(folder):
    """A byte-level BPE tokenizer trained on the data's words, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = " ".join(ANIMALS) + " where is the sat on mat user assistant system"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        [words] * 4,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny"))


def make_tiny_chat_model(root) -> dict:
    """A tiny random Llama folder with a tokenizer under `root`, and a chat dataset with one
    bad row: ``{"root", "model", "data"}``."""
    model_dir = root / "model"
    tokenizer = _tokenizer(model_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=0,
        initializer_range=0.2,
    )  # logits of a useful range: the frozen head can fit the data
    transformers.LlamaForCausalLM(config).eval().save_pretrained(model_dir)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _rows()))
    return {"root": root, "model": model_dir, "data": data}


def run(*argv: str) -> tuple[int, str, str]:
    """``jpeft *argv`` in-process: ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _config_file(tiny, tmp_path) -> str:
    """Options from a YAML file: several dash/underscore spellings, a YAML string number."""
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {tiny['model']}\n"
        f"data: {tiny['data']}\n"
        "rank: 4\nalpha: 8\ntargets: all-linear\n"
        "lr: 3e-2\n"  # YAML reads 3e-2 as a string; the CLI parses it as --lr does
        "warmup-steps: 2\n"
        "max_steps: 5\n"  # overridden on the command line
        "batch_size: 4\neval_split: 0.25\neval_every: 10\nsave_every: 10\nbucket: 32\n"
        "progress: false\n"
    )
    return str(path)


TRAIN_STEPS = 30


def _train_args(tiny, tmp_path, out) -> list[str]:
    return [
        "train",
        "--config",
        _config_file(tiny, tmp_path),
        "--out",
        out,
        "--max-steps",
        str(TRAIN_STEPS),
    ]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """One ``jpeft train`` run that the later tests inspect and build on."""
    work = tmp_path_factory.mktemp("trained")
    out = work / "run"
    code, stdout, stderr = run(*_train_args(tiny, work, out))
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "stderr": stderr, "work": work}


def _adapted(tiny, adapter):
    """jpeft's model and its tree with `adapter` loaded (a jpeft or HF PEFT folder)."""
    model, base = jpeft.models.from_pretrained(tiny["model"])
    if (adapter / peft_format.CONFIG_FILE).exists():
        return model, peft_format.import_peft(base, adapter)
    return model, checkpoint.load_adapter(base, adapter)


def _ids(tiny):
    tokenizer = jpeft.models.load_tokenizer(tiny["model"])
    return np.array(
        [tokenizer("where is the fox")["input_ids"] + tokenizer("the ram sat on")["input_ids"]],
        np.int32,
    )


def _adapter_arrays(params):
    return {
        "/".join(map(str, (*keys, f))): np.asarray(getattr(node, f))
        for keys, node in jpeft.tree.iter_nodes(lora.extract(params))
        for f in ("a", "b", "scale")
    }


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
    args = _train_args(tiny, tmp_path, out)
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
    resumed = _adapter_arrays(checkpoint.load_adapter(base, out / "adapter"))
    straight = _adapter_arrays(checkpoint.load_adapter(base, trained["out"] / "adapter"))
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
    model, params = _adapted(tiny, trained["out"] / "adapter")
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


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


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
    model, params = _adapted(tiny, trained["out"] / "adapter")
    ids = _ids(tiny)
    expected = np.asarray(model(lora.merge(params), ids))
    np.testing.assert_allclose(_hf_logits(loaded, ids), expected, rtol=0, atol=1e-4)
    # The adapter changed the model, and the tokenizer came along.
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    assert np.abs(_hf_logits(base, ids) - expected).max() > 1e-2
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
    ids = _ids(tiny)
    np.testing.assert_allclose(
        _hf_logits(loaded, ids), np.asarray(model(lora.merge(params), ids)), rtol=0, atol=1e-4
    )


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
    trees = [_adapted(tiny, two_adapters[n])[1] for n in ("x", "y")]
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
    ours, theirs = _adapter_arrays(written), _adapter_arrays(expected)
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
    ids = _ids(tiny)
    expected = np.asarray(model(lora.merge(combined), ids))
    np.testing.assert_allclose(_hf_logits(loaded, ids), expected, rtol=0, atol=1e-4)
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
    model, params = _adapted(tiny, trained["out"] / "adapter")
    ids = _ids(tiny)
    np.testing.assert_allclose(
        _hf_logits(peft_model, ids), np.asarray(model(params, ids)), rtol=0, atol=1e-4
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
    _, imported = _adapted(tiny, tmp_path / "imported")
    _, original = _adapted(tiny, trained["out"] / "adapter")
    imported, original = _adapter_arrays(imported), _adapter_arrays(original)
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
    model, params = _adapted(tiny, out / "adapter")
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


# ----------------------------------------------------------------------------- help and errors


def test_help_of_every_command_describes_every_flag(capsys):
    parser = cli.build_parser()
    (commands,) = parser._subparsers._group_actions  # the sub-command action
    assert set(commands.choices) == {
        "train",
        "generate",
        "merge",
        "export-hf",
        "import-hf",
        "inspect",
        "bench",
    }
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    for name, sub in commands.choices.items():
        assert name in top
        assert cli.main([name, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            if action.help and action.dest != "help":
                words = " ".join(action.help.split())
                assert "default" in words or "required" in words or not action.option_strings, (
                    name,
                    action.dest,
                )
    code = subprocess.run(
        [sys.executable, "-m", "jpeft", "train", "--help"], capture_output=True, text=True
    ).returncode
    assert code == 0


@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "missing data",
        "unknown config key",
        "not an adapter",
        "targets match nothing",
        "missing path",
        "eval twice",
        "no model",
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, tiny, tmp_path):
    model, data = tiny["model"], tiny["data"]
    out = tmp_path / "out"
    argv, expected = {
        "missing model": (
            ["train", tmp_path / "nope", "--data", data, "--out", out],
            "does not exist",
        ),
        "missing data": (
            ["train", model, "--data", tmp_path / "nope.jsonl", "--out", out],
            "nope.jsonl does not exist",
        ),
        "unknown config key": (
            ["train", "--config", _bad_config(tmp_path, tiny), "--out", out],
            "unknown keys: learning_rat, optimiser",
        ),
        "not an adapter": (
            ["generate", model, "--adapter", tmp_path, "--prompt", "hi"],
            "neither a jpeft adapter",
        ),
        "targets match nothing": (
            ["train", model, "--data", data, "--out", out, "--targets", "qq_proj"],
            "qq_proj",
        ),
        "missing path": (["inspect", tmp_path / "nothing"], "nothing does not exist"),
        "eval twice": (
            [
                "train",
                model,
                "--data",
                data,
                "--out",
                out,
                "--eval-data",
                data,
                "--eval-split",
                "0.1",
            ],
            "not both",
        ),
        "no model": (["train", "--data", data, "--out", out], "train needs MODEL"),
    }[case]
    code, stdout, stderr = run(*argv)
    assert code == 2
    assert stderr.startswith("jpeft: error: ") and expected in stderr, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1


def _bad_config(tmp_path, tiny):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "model": str(tiny["model"]),
                "data": str(tiny["data"]),
                "learning_rat": 1e-3,
                "optimiser": "adam",
                "rank": 4,
            }
        )
    )
    return path


def test_distributed_flags_go_to_jpeft_distributed(tiny, tmp_path):
    args = ["train", tiny["model"], "--data", tiny["data"], "--out", tmp_path / "out"]
    # Half a multi-host set-up: jpeft.distributed names what is missing.
    code, _, stderr = run(*args, "--coordinator", "127.0.0.1:1234")
    assert code == 2 and stderr.startswith("jpeft: error: ") and "num_processes" in stderr
    assert "Traceback" not in stderr
