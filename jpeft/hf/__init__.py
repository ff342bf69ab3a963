"""Hugging Face formats: local checkpoints (safetensors, GGUF and its tokenizer), the PEFT
adapter format, bitsandbytes 4-bit checkpoints."""

from jpeft.hf import (
    bitsandbytes,
    checkpoints,
    peft_format,
)
from jpeft.hf.checkpoints import CheckpointError
from jpeft.hf.peft_format import export_peft, import_peft

__all__ = [
    "CheckpointError",
    "bitsandbytes",
    "checkpoints",
    "export_peft",
    "import_peft",
    "peft_format",
]
