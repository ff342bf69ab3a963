"""Tiny random transformers models for parity tests (float32, CPU, no network)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0}),
    "llama-tied-bias": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "llama3-rope-scaled": lambda: transformers.LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-linear-rope": lambda: transformers.LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32,
                                            n_layer=2, n_head=4),
}


def make(kind: str, folder, seed: int = 0, initializer_range: float | None = None):
    """Builds a random `kind` model, saves it to `folder` and returns it (eval mode).
    `initializer_range`: the weights' standard deviation, when not transformers' 0.02."""
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    if initializer_range is not None:
        config.initializer_range = initializer_range
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise them to test them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """transformers' logits with jpeft's position convention (counted over real tokens)."""
    mask = torch.tensor(attention_mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids), attention_mask=mask, position_ids=positions)
    return out.logits.numpy()
