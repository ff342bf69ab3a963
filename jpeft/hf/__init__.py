"""Hugging Face formats: local checkpoints (safetensors, GGUF)."""

from jpeft.hf import checkpoints, peft_format
from jpeft.hf.checkpoints import CheckpointError
from jpeft.hf.peft_format import export_peft, import_peft

__all__ = ["CheckpointError", "checkpoints", "export_peft", "import_peft", "peft_format"]
