"""jpeft: parameter-efficient fine-tuning of large language models in JAX.

Methods are pure functions over parameter pytrees; models are jpeft's own JAX forward
functions over Hugging Face-named trees, loaded from safetensors folders or GGUF files.
"""

from jpeft import (
    adapters,
    checkpoint,
    data,
    distributed,
    dora,
    generation,
    hf,
    ia3,
    lora,
    lora_combination,
    methods,
    models,
    nn,
    parallel,
    qlora,
    quant,
    targets,
    train,
    train_state,
    trainer,
    tree,
    wrapping,
)
from jpeft.checkpoint import load_adapter, save_adapter
from jpeft.generation import generate
from jpeft.hf.checkpoints import CheckpointError
from jpeft.tree import combine, count_parameters, print_trainable_parameters, split, trainable_mask
from jpeft.wrapping import wrap

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "adapters",
    "checkpoint",
    "combine",
    "count_parameters",
    "data",
    "distributed",
    "dora",
    "generate",
    "generation",
    "hf",
    "ia3",
    "load_adapter",
    "lora",
    "lora_combination",
    "methods",
    "models",
    "nn",
    "parallel",
    "print_trainable_parameters",
    "qlora",
    "quant",
    "save_adapter",
    "split",
    "targets",
    "train",
    "train_state",
    "tree",
    "trainable_mask",
    "trainer",
    "wrap",
    "wrapping",
]
