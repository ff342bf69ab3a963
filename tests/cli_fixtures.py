"""What the command-line tests share: a tiny random Llama folder with a tiny byte-level BPE
tokenizer (a real transformers tokenizer and chat template) and a chat dataset with one bad
row; ``jpeft`` run in-process; the options of one short training run; and reading back what
the commands write."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import transformers

import jpeft
from jpeft import checkpoint, cli, lora
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


def train_args(tiny, tmp_path, out) -> list[str]:
    """``jpeft train`` of `tiny` for :data:`TRAIN_STEPS` steps into `out`, options from a
    YAML file under `tmp_path`."""
    return [
        "train",
        "--config",
        _config_file(tiny, tmp_path),
        "--out",
        out,
        "--max-steps",
        str(TRAIN_STEPS),
    ]


def adapted(tiny, adapter):
    """jpeft's model and its tree with `adapter` loaded (a jpeft or HF PEFT folder)."""
    model, base = jpeft.models.from_pretrained(tiny["model"])
    if (adapter / peft_format.CONFIG_FILE).exists():
        return model, peft_format.import_peft(base, adapter)
    return model, checkpoint.load_adapter(base, adapter)


def token_ids(tiny):
    """``[1, t]`` int32 ids of two of the data's phrases, for comparing logits."""
    tokenizer = jpeft.models.load_tokenizer(tiny["model"])
    return np.array(
        [tokenizer("where is the fox")["input_ids"] + tokenizer("the ram sat on")["input_ids"]],
        np.int32,
    )


def adapter_arrays(params):
    """Every LoRA factor and scale of `params` by its path, as numpy arrays."""
    return {
        "/".join(map(str, (*keys, f))): np.asarray(getattr(node, f))
        for keys, node in jpeft.tree.iter_nodes(lora.extract(params))
        for f in ("a", "b", "scale")
    }


def hf_logits(model, ids):
    """A transformers model's logits of `ids`, as numpy."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
