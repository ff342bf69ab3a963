"""Hugging Face formats: local checkpoints (safetensors, GGUF)."""

from jpeft.hf import checkpoints
from jpeft.hf.checkpoints import CheckpointError

__all__ = ["CheckpointError", "checkpoints"]
