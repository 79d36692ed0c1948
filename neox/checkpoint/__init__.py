"""Reading trained checkpoints back as one full model: find, consolidate (any ZeRO stage), load for inference,
and the topology-free consolidated format (model.safetensors + config.yml + tokenizer/)."""
from neox.checkpoint.consolidated import (
    CONSOLIDATED_FORMAT,
    CheckpointError,
    checkpoint_tokenizer,
    consolidate,
    find_checkpoint,
    is_consolidated,
    load_model,
    read_consolidated,
    save_consolidated,
)

__all__ = [
    "CONSOLIDATED_FORMAT",
    "CheckpointError",
    "checkpoint_tokenizer",
    "consolidate",
    "find_checkpoint",
    "is_consolidated",
    "load_model",
    "read_consolidated",
    "save_consolidated",
]
