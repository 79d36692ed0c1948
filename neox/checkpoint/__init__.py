"""The one home of training state: the engine's save / resume / finetune (engine_state), saved in the background with
checkpoint_async (async_save), the layout-free copy any layout resumes from (layout_state: each rank writes the shard
it owns and reads only the ranges it needs, through layout_engine, layout_sources, regions and shard_files; rebuilt
offline by layout_rebuild), reading trained checkpoints back as one full
model (consolidated: any ZeRO stage or layout, and gpt-neox's own, gpt_neox), the topology-free consolidated format,
HF import / export, vocabulary re-padding across tp and S3 upload; safe_load reads DeepSpeed's files without
running code."""
from neox.checkpoint.consolidated import (
    CONSOLIDATED_FORMAT,
    checkpoint_tokenizer,
    consolidate,
    find_checkpoint,
    is_consolidated,
    load_model,
    read_consolidated,
    save_consolidated,
)
from neox.checkpoint.errors import CheckpointError

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
