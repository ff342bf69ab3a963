"""The real model: SmolLM2-135M-Instruct from its GGUF file, against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import jpeft
from jpeft.generation import encode_prompts, generate_tokens

LOGITS_TOLERANCE = 1e-3  # float32, 30 layers: summation order differs between XLA and torch
CACHE_TOLERANCE = 1e-3  # float32, 30 layers: one-token matmuls vs full-sequence ones (seen 2e-4)
PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]

pytestmark = pytest.mark.xdist_group("test_smollm2")  # one worker loads both models


@pytest.fixture(scope="module")
def loaded(smollm2_file, smollm2_transformers):
    model, params = jpeft.models.from_pretrained(smollm2_file)
    tokenizer = jpeft.models.load_tokenizer(smollm2_file)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_transformers, dtype=torch.float32
    ).eval()
    return model, params, tokenizer, reference


def test_logits_match_transformers(loaded):
    model, params, tokenizer, reference = loaded
    batch = tokenizer(["The quick brown fox jumps over", "JAX is"], padding=True,
                      return_tensors="np")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             position_ids=torch.tensor(positions)).logits.numpy()
    out = np.asarray(model(params, ids, attention_mask=mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], expected[valid], atol=LOGITS_TOLERANCE)


def test_greedy_generation_matches_transformers(loaded):
    model, params, tokenizer, reference = loaded
    ids, mask = encode_prompts(tokenizer, [PROMPT])
    ours = np.asarray(generate_tokens(model, params, ids, mask, max_new_tokens=24))
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        theirs = reference.generate(**prompt, max_new_tokens=24, min_new_tokens=24,
                                    do_sample=False)[0, prompt["input_ids"].shape[1]:].numpy()
    np.testing.assert_array_equal(ours[0], theirs)
    text = jpeft.generate(model, params, tokenizer, [PROMPT], max_new_tokens=24)[0]
    assert text == tokenizer.decode(theirs, skip_special_tokens=True).split("<|im_end|>")[0]


def test_kv_cache_decoding_equals_full_recomputation(loaded):
    model, params, tokenizer, _ = loaded
    ids = np.asarray(tokenizer(["Once upon a time, in a land far away"])["input_ids"], np.int32)
    prompt, rest = ids[:, :5], ids[:, 5:]
    full = np.asarray(model(params, ids))
    cache = model.init_cache(1, ids.shape[1])
    hidden, cache = model.hidden_states(params, prompt, cache=cache)
    steps = [model.logits(params, hidden)]
    for i in range(rest.shape[1]):
        hidden, cache = model.hidden_states(params, rest[:, i : i + 1], cache=cache)
        steps.append(model.logits(params, hidden))
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(cached, full, atol=CACHE_TOLERANCE)
