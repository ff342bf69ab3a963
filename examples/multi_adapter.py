"""Three task adapters over one base, served together: one mixed batch, one compiled program.

SmolLM2-135M-Instruct learns three unrelated skills, each with a LoRA adapter of its own,
trained on bundled data written for the project:

- ``people_json``: a sentence about a person -> one strict JSON object (the demo's task),
- ``dates_iso``: a date in words -> ISO 8601 (``2021-03-07``),
- ``review_sentiment``: a short product review -> ``positive`` or ``negative``.

The three adapters are saved, loaded back from disk over one base with
:func:`jpeft.adapters.load`, and every held-out prompt of the three tasks runs as one mixed
batch in which each row names its adapter (``adapter_ids``): the base weights are shared,
each row's adapter is gathered inside the one compiled generation loop. Printed: an answer per
adapter, each adapter's held-out exact-match score from that mixed batch, and the same rows
run through the base alone. Adapters already trained in ``out/multi_adapter`` are reused.

Run with ``.venv/bin/python examples/multi_adapter.py`` (about ten minutes on two cores, most of it training).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import jax
import numpy as np
from demo import ROOT, score, smollm2_gguf

import jpeft
from jpeft import data, lora, trainer

OUT = ROOT / "out" / "multi_adapter"
TASKS = {  # name -> (training steps, how an answer is marked)
    "people_json": (40, lambda answer, reference: score(answer, reference)[0]),
    "dates_iso": (30, lambda answer, reference: answer.strip() == reference),
    "review_sentiment": (20, lambda answer, reference: answer.strip().lower() == reference),
}
MAX_NEW_TOKENS = 48  # the longest answer (people_json) needs about 40 tokens


def train_adapter(name: str, steps: int, model, params, tokenizer) -> Path:
    """Trains a LoRA adapter for task `name` into ``OUT/name`` (kept if already there)."""
    out = OUT / name
    if (out / "adapter").exists():
        print(f"{name}: reusing {out / 'adapter'}")
        return out
    rows = data.load_rows(ROOT / "data" / name / "train.jsonl")
    examples, _ = data.tokenize(rows, tokenizer, max_length=256)
    config = lora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    adapted = lora.apply(params, config=config, key=jax.random.key(0))
    started = time.perf_counter()
    trainer.fit(
        model,
        adapted,
        examples,
        out,
        pad_id=tokenizer.pad_token_id,
        progress=False,
        adapter_config=dataclasses.asdict(config),
        config=trainer.TrainConfig(
            learning_rate=1e-3,
            warmup_steps=4,
            batch_size=8,
            max_steps=steps,
            bucket=32,
            save_every=steps,
        ),
    )
    print(f"{name}: trained {steps} steps of 8 in {time.perf_counter() - started:.0f}s")
    return out


def main() -> None:
    started = time.perf_counter()
    path = smollm2_gguf()
    model, params = jpeft.models.from_pretrained(path)
    tokenizer = jpeft.models.load_tokenizer(path)
    folders = {
        name: train_adapter(name, steps, model, params, tokenizer)
        for name, (steps, _) in TASKS.items()
    }

    # One base, three adapters, read back from disk (jpeft or Hugging Face PEFT folders).
    multi = jpeft.adapters.load(params, folders)
    print(f"\nloaded {jpeft.adapters.names(multi)} over one base")

    # Every held-out prompt of every task, interleaved, each row naming its adapter.
    per_task = [
        [
            (name, row["messages"][:1], row["messages"][1]["content"])
            for row in data.load_rows(ROOT / "data" / name / "test.jsonl")
        ]
        for name in TASKS
    ]
    rows = [row for group in itertools.zip_longest(*per_task) for row in group if row]
    prompts = [prompt for _, prompt, _ in rows]
    ids = jpeft.adapters.adapter_ids(multi, [name for name, _, _ in rows])

    timer = time.perf_counter()
    answers = jpeft.generate(
        model, multi.params, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, adapter_ids=ids
    )
    mixed_s = time.perf_counter() - timer
    base = jpeft.generate(
        model,
        multi.params,
        tokenizer,
        prompts,
        max_new_tokens=MAX_NEW_TOKENS,
        adapter_ids=np.full(len(rows), -1, np.int32),  # -1: the base alone, same program
    )

    print(
        f"\none mixed batch of {len(rows)} prompts over {len(TASKS)} adapters, "
        f"{mixed_s:.1f}s (compilation included):"
    )
    shown = set()
    for (name, prompt, _), answer in zip(rows, answers, strict=True):
        if name not in shown:
            shown.add(name)
            print(f"  [{name}] {prompt[0]['content']}\n      -> {answer.strip()}")
    print("\nheld-out exact match, base -> its adapter (from the mixed batch):")
    scores = {}
    for name, (_, mark) in TASKS.items():
        mine = [i for i, row in enumerate(rows) if row[0] == name]
        tuned = sum(mark(answers[i], rows[i][2]) for i in mine) / len(mine)
        before = sum(mark(base[i], rows[i][2]) for i in mine) / len(mine)
        scores[name] = {"base": before, "adapter": tuned, "rows": len(mine)}
        print(f"  {name:17s} {before:4.0%} -> {tuned:4.0%}  ({len(mine)} prompts)")
    (OUT / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    print(
        f"\nadapters: {', '.join(str(f) for f in folders.values())}; "
        f"total time {time.perf_counter() - started:.0f}s"
    )


if __name__ == "__main__":
    main()
