"""`jpeft generate` with several adapters: the rows of --prompts, each naming its adapter, run
as mixed batches and print what each row gives alone through the library; bad rows and
unknown names are usage errors."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import pytest
from cli_fixtures import run, tiny  # noqa: F401  (tiny is a fixture)

import jpeft
from jpeft import ia3, lora, prompt_tuning, tree


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):  # noqa: F811
    """Three adapters of the tiny model: a jpeft LoRA, a PEFT IA3, a jpeft prompt tuning."""
    root = tmp_path_factory.mktemp("adapters")
    model, base = jpeft.models.from_pretrained(tiny["model"])
    key = jax.random.key(0)
    config = lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapted = lora.apply(base, config=config, key=key)
    adapted = tree.map_nodes(
        lambda p, x: (
            dataclasses.replace(x, b=jax.random.normal(key, x.b.shape))
            if isinstance(x, lora.LoraWeight)
            else x
        ),
        adapted,
    )
    made = {
        "lora": adapted,
        "ia3": tree.map_nodes(
            lambda p, x: (
                dataclasses.replace(x, vector=2 * x.vector) if isinstance(x, ia3.IA3Weight) else x
            ),
            ia3.apply(base, model=model, config=ia3.IA3Config(), key=key),
        ),
        "prompt": prompt_tuning.apply(base, model=model, key=key, num_virtual_tokens=4),
    }
    jpeft.save_adapter(made["lora"], root / "lora")
    jpeft.hf.export_peft(made["ia3"], root / "ia3")
    jpeft.save_adapter(made["prompt"], root / "prompt")
    return root, made, model, base


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_mixed_rows_print_what_each_row_gives_alone(tiny, folders, tmp_path):  # noqa: F811
    root, made, model, base = folders
    chat = [{"role": "user", "content": "where is the owl"}]
    rows = [
        {"adapter": "lora", "prompt": "where is the fox"},
        {"adapter": "ia3", "messages": chat},
        {"adapter": None, "prompt": "where is the fox"},
        {"adapter": "prompt", "prompt": "where is the fox"},
        {"adapter": "lora", "messages": chat},
    ]
    prompts = _write_rows(tmp_path / "rows.jsonl", rows)
    adapters = [f"--adapter={name}={root / name}" for name in ("lora", "ia3", "prompt")]
    code, stdout, stderr = run(
        "generate", tiny["model"], *adapters, "--prompts", prompts, "--max-new-tokens", "6",
        "--batch-size", "3",
    )  # fmt: skip
    assert code == 0, stderr
    tokenizer = jpeft.models.load_tokenizer(tiny["model"])
    expected = []
    for i, row in enumerate(rows):
        params = base if row["adapter"] is None else made[row["adapter"]]
        prompt = row.get("prompt") or row["messages"]
        answer = jpeft.generate(model, params, tokenizer, [prompt], max_new_tokens=6)[0]
        shown = row.get("prompt") or chat[-1]["content"]
        expected += [f"--- prompt {i + 1} [{row['adapter'] or 'base'}]: {shown}", answer]
    assert stdout == "".join(f"{line}\n" for line in expected)  # answers may hold newlines
    assert len(set(expected[1::2])) > 1  # the adapters do change the answers


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"adapter": "nope", "prompt": "hi"}, "no adapter named 'nope'; loaded: \\['lora'\\]"),
        ({"prompt": "hi"}, 'line 1: expected an object with an "adapter"'),
        ({"adapter": "lora"}, 'line 1: expected a non-empty "prompt"'),
        ({"adapter": 3, "prompt": "hi"}, '"adapter" must be a name or null'),
        ("not json", "line 1: not JSON"),
    ],
)
def test_bad_rows_are_usage_errors(tiny, folders, tmp_path, row, message):  # noqa: F811
    root = folders[0]
    path = tmp_path / "rows.jsonl"
    path.write_text((row if isinstance(row, str) else json.dumps(row)) + "\n")
    code, _, stderr = run(
        "generate", tiny["model"], "--adapter", f"lora={root / 'lora'}", "--prompts", path
    )
    assert code == 2
    assert re.search(message, stderr), stderr


def test_several_adapters_need_rows_that_name_them(tiny, folders):  # noqa: F811
    root = folders[0]
    code, _, stderr = run(
        "generate", tiny["model"], "--adapter", f"a={root / 'lora'}",
        "--adapter", f"b={root / 'ia3'}", "--prompt", "hi",
    )  # fmt: skip
    assert code == 2
    assert "with several adapters, give the prompts with --prompts" in stderr
    code, _, stderr = run("generate", tiny["model"])
    assert code == 2
    assert "--prompt or --prompts" in stderr
