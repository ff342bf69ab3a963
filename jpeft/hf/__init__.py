"""Hugging Face formats: local checkpoints (safetensors, GGUF and its tokenizer), the PEFT
adapter format, bitsandbytes 4-bit checkpoints, AdapterHub's bottleneck adapters."""

from jpeft.hf import (
    adapterhub,
    bitsandbytes,
    checkpoints,
    peft_format,
)
from jpeft.hf.adapterhub import export_adapterhub, import_adapterhub
from jpeft.hf.checkpoints import CheckpointError
from jpeft.hf.peft_format import export_peft, import_peft

__all__ = [
    "CheckpointError",
    "adapterhub",
    "bitsandbytes",
    "checkpoints",
    "export_adapterhub",
    "export_peft",
    "import_adapterhub",
    "import_peft",
    "peft_format",
]
