"""Prompt tuning (Lester et al., 2021): ``p`` trained soft-prompt embeddings before every
sequence, Hugging Face PEFT's ``PromptTuningConfig``.

The prompt ``P: [p, d]`` is a :class:`SoftPrompt` node in the tree's reserved entry,
``params["virtual_tokens"]["prompt"]`` (:mod:`jpeft.models.virtual_tokens`), which the
forward of every jpeft model reads: the model sees ``[P; embed(ids)]``, the virtual tokens
take positions ``0..p-1`` and carry no labels, and logits come back for the real tokens only,
aligned with ``input_ids``. No weight changes, so there is nothing to merge.

Initialisation, as PEFT's ``PromptEmbedding``:

* ``RANDOM``: ``P ~ N(0, 1)`` (``torch.nn.Embedding``'s default);
* ``SAMPLE_VOCAB``: the embeddings of ``p`` token ids drawn uniformly from the vocabulary;
* ``TEXT``: the embeddings of the tokens of `prompt_tuning_init_text` (as the tokenizer
  encodes it, special tokens included), repeated or cut to ``p``.

Example::

    params = jpeft.prompt_tuning.apply(params, model=model, num_virtual_tokens=8,
                                       key=jax.random.key(0))
    logits = model(params, input_ids)      # [b, t, v]: the 8 virtual tokens left out
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import methods, nn, tree
from jpeft.models import virtual_tokens

_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig:
    """Prompt-tuning settings with Hugging Face PEFT's field names.

    Attributes:
      num_virtual_tokens: ``p``, the soft prompt's length.
      prompt_tuning_init: ``"RANDOM"``, ``"SAMPLE_VOCAB"`` or ``"TEXT"`` (see the module).
      prompt_tuning_init_text: the text whose token embeddings start the prompt (``TEXT``).
      tokenizer_name_or_path: a local model folder or GGUF file whose tokenizer encodes it
        (``TEXT``, when :func:`apply` is given no tokenizer).
    """

    num_virtual_tokens: int = dataclasses.field(
        default=8,
        metadata={"help": "number of soft-prompt tokens", "flag": "--num-virtual-tokens"},
    )
    prompt_tuning_init: str = dataclasses.field(
        default="RANDOM",
        metadata={"help": "RANDOM, SAMPLE_VOCAB or TEXT", "flag": "--prompt-tuning-init"},
    )
    prompt_tuning_init_text: str | None = dataclasses.field(
        default=None,
        metadata={"help": "the text that starts the prompt (TEXT init)", "flag": "--init-text"},
    )
    tokenizer_name_or_path: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "model folder or GGUF file whose tokenizer encodes --init-text",
            "flag": "--tokenizer",
        },
    )

    def __post_init__(self):
        virtual_tokens.check_count(self.num_virtual_tokens)
        if self.prompt_tuning_init not in _INITS:
            raise ValueError(
                f"prompt_tuning_init {self.prompt_tuning_init!r} is not one of {list(_INITS)}"
            )
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")


@tree.node
class SoftPrompt(tree.Node):
    """Trained soft-prompt embeddings, an entry of their own in the tree.

    Attributes:
      embedding: ``[p, d]`` float32 (PEFT's ``prompt_embeddings``).
    """

    embedding: jax.Array

    kind: ClassVar[str] = "prompt_tuning"
    trainable_fields: ClassVar[tuple[str, ...]] = ("embedding",)
    standalone: ClassVar[bool] = True

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]


nn.register("value", SoftPrompt)(lambda node: node.embedding)


def apply(
    params: dict,
    *,
    model: Any,
    key: jax.Array,
    config: PromptTuningConfig | None = None,
    tokenizer: Any = None,
    **options: Any,
) -> dict:
    """Adds a soft prompt to a parameter tree.

    Args:
      params: the base model's tree (without virtual tokens).
      model: its jpeft model (for the embedding table).
      key: PRNG key for the ``RANDOM`` and ``SAMPLE_VOCAB`` inits.
      config: a full :class:`PromptTuningConfig`, or its fields as `options`.
      tokenizer: encodes the ``TEXT`` init's text; by default the tokenizer of
        ``config.tokenizer_name_or_path``.

    Returns:
      `params` with ``params["virtual_tokens"]["prompt"]`` a :class:`SoftPrompt`.

    Raises:
      ValueError: bad options, a tree that already has a soft prompt, a ``TEXT`` init
        without a tokenizer or with a text that encodes to no token.
    """
    if config is None:
        config = PromptTuningConfig(**options)
    elif options:
        raise ValueError("pass either config or its fields as options, not both")
    entry = dict(params.get(virtual_tokens.ENTRY) or {})
    if "prompt" in entry:
        raise ValueError(f"params[{virtual_tokens.ENTRY!r}] already has a soft prompt")
    table = nn.value(model.embedding(params))
    p = config.num_virtual_tokens
    if config.prompt_tuning_init == "RANDOM":
        embedding = jax.random.normal(key, (p, table.shape[-1]), jnp.float32)
    else:
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            ids = jax.random.randint(key, (p,), 0, table.shape[0])
        else:
            ids = _text_ids(config, tokenizer)
        embedding = jnp.asarray(table, jnp.float32)[ids]
    return {**params, virtual_tokens.ENTRY: {**entry, "prompt": SoftPrompt(embedding)}}


def _text_ids(config: PromptTuningConfig, tokenizer: Any) -> np.ndarray:
    """The init text's token ids, repeated or cut to ``p``, as PEFT's ``PromptEmbedding``."""
    if tokenizer is None:
        if not config.tokenizer_name_or_path:
            raise ValueError(
                "prompt_tuning_init='TEXT' needs a tokenizer: pass tokenizer= or set "
                "tokenizer_name_or_path"
            )
        from jpeft import models

        tokenizer = models.load_tokenizer(config.tokenizer_name_or_path)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"the init text {config.prompt_tuning_init_text!r} encodes to no token")
    p = config.num_virtual_tokens
    return np.asarray((ids * math.ceil(p / len(ids)))[:p], np.int32)


def _to_peft(params: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
    """PEFT's ``adapter_config.json`` fields and tensors of the soft prompt, if any."""
    node = (params.get(virtual_tokens.ENTRY) or {}).get("prompt")
    if not isinstance(node, SoftPrompt):
        return None
    p, d = node.embedding.shape
    config = {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": p,
        "token_dim": d,
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",  # the init is spent: the saved prompt is what counts
    }
    return config, {"prompt_embeddings": np.asarray(node.embedding, np.float32)}


def _from_peft(base_params: dict, config: dict, tensors: dict[str, np.ndarray]) -> dict:
    """The tree of a PEFT prompt-tuning adapter (``prompt_embeddings: [p, d]``)."""
    p = config.get("num_virtual_tokens")
    embedding = np.asarray(tensors["prompt_embeddings"], np.float32)
    if config.get("num_transformer_submodules", 1) != 1 or embedding.shape[0] != p:
        raise ValueError(
            f"prompt_embeddings has shape {embedding.shape}; a decoder-only model's prompt "
            f"of num_virtual_tokens={p} has {p} rows"
        )
    entry = {**(base_params.get(virtual_tokens.ENTRY) or {}), "prompt": SoftPrompt(embedding)}
    return {**base_params, virtual_tokens.ENTRY: entry}


methods.register(
    methods.Method(
        name="prompt",
        title="prompt tuning",
        config_class=PromptTuningConfig,
        apply=apply,
        peft_type="PROMPT_TUNING",
        identity_at_init=False,
        to_peft=_to_peft,
        from_peft=_from_peft,
    )
)
