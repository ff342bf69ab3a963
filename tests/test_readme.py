"""The README's Python blocks run exactly as written, and a train step leaves the tree that
its trainable half was split from usable."""

import re
from pathlib import Path

import jax
import numpy as np
import optax

import jpeft

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_script_runs_as_written(smollm2_file, tmp_path, monkeypatch, capsys):
    blocks = _python_blocks()
    assert blocks, "README.md has no python block"
    (tmp_path / smollm2_file.name).symlink_to(smollm2_file)
    monkeypatch.chdir(tmp_path)
    tokenizer = jpeft.models.load_tokenizer(smollm2_file)
    text = ["The cat sat on the mat.", "JAX compiles once."]
    encoded = tokenizer(text, padding=True, return_tensors="np")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    # `batch` is the one name the README leaves to the reader, as it says below the block
    namespace = {
        "batch": {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask > 0, ids, -100)}
    }
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "trainable params: 460,800 || all params: 134,975,808 || trainable%: 0.3414" in out
    assert np.isfinite(float(namespace["metrics"]["loss"]))
    multi = namespace["multi"]
    assert jpeft.adapters.names(multi) == ("chat", "ia3")
    bank = multi.params["model"]["layers"]["self_attn"]["v_proj"]["weight"]  # LoRA and IA3
    np.testing.assert_array_equal(bank.index, np.ones(30))  # set_adapter: "ia3" for all rows
    np.testing.assert_array_equal(bank.base.index, np.ones(30))
    served = namespace["served"]
    assert not any(isinstance(x, jpeft.tree.Node) for _, x in jpeft.tree.iter_nodes(served))


def test_a_step_leaves_the_split_tree_usable(smollm2_file):
    """`split` shares buffers with the tree; the step must not delete them by donation."""
    model, params = jpeft.models.from_pretrained(smollm2_file)
    params = jpeft.lora.apply(params, rank=2, targets=["q_proj"], key=jax.random.key(0))
    trainable, frozen = jpeft.split(params)
    optimizer = optax.adamw(1e-3)
    step = jpeft.train.make_train_step(model, optimizer)
    ids = np.arange(8, dtype=np.int32)[None]
    trainable, _, _ = step(
        trainable, frozen, optimizer.init(trainable), {"input_ids": ids}, jax.random.key(1)
    )
    for leaf in jax.tree.leaves(params):  # every buffer of the original tree still readable
        np.asarray(leaf)
    assert model(params, ids).shape == (1, 8, 49152)
