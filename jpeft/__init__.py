"""jpeft: parameter-efficient fine-tuning of large language models in JAX.

Methods are pure functions over parameter pytrees; models are jpeft's own JAX forward
functions over Hugging Face-named trees, loaded from safetensors folders or GGUF files.
"""

from jpeft import hf, models, nn
from jpeft.generate import generate
from jpeft.hf.checkpoints import CheckpointError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "generate", "hf", "models", "nn"]
