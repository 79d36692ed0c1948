"""checkpoint_validation_with_forward_pass: a checkpoint carries a forward pass's input and output, and a run that
loads it repeats the pass and compares.

The input is gpt-neox's: every sequence of the micro-batch is 0, 1, ..., seq_length (here modulo the vocabulary).
The output compared is the loss of that batch in eval mode (no dropout) rather than one rank's logits: it is the
same number at every tensor/pipeline/data-parallel layout, so the check also holds when a checkpoint is resumed
at another layout. As gpt-neox: bit-equal passes silently, close (torch.isclose's tolerances) passes with a
warning, anything else is an error.
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import torch

from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.safe_load import weights_only_load
from neox.data.loader import collate_samples

FILE_NAME = "forward_check.pt"
# torch.isclose's defaults, which gpt-neox's check uses.
RTOL, ATOL = 1e-5, 1e-8


def reference_text(micro_batch: int, seq_length: int, vocab_size: int) -> torch.Tensor:
    row = torch.arange(seq_length + 1, dtype=torch.int64) % vocab_size
    return row.repeat(micro_batch, 1)


def forward_loss(train_engine, text: torch.Tensor, grad_accum: int) -> float:
    """Collective (every rank of the run calls it): the eval-mode loss of `text`, without touching any RNG."""
    batch = collate_samples([{"text": row.numpy()} for row in text], eod_token=-1, eod_mask_loss=False)
    engine = train_engine.engine
    was_training = engine.training
    devices = [train_engine.device] if train_engine.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        engine.eval()
        try:
            if hasattr(train_engine, "eval_loss"):
                loss = train_engine.eval_loss(itertools.repeat(batch), 1, grad_accum)
            else:
                loss = train_engine.micro_loss(batch)
        finally:
            engine.train(was_training)
    return float(torch.as_tensor(loss).float().item())


def save_record(ckpt_dir: Path, text: torch.Tensor, loss: float, iteration: int) -> None:
    path = ckpt_dir / FILE_NAME
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"text": text, "loss": float(loss), "iteration": int(iteration)}, tmp)
    os.replace(tmp, path)


def read_record(ckpt_dir: Path) -> dict | None:
    path = ckpt_dir / FILE_NAME
    return weights_only_load(path) if path.is_file() else None


def input_for(record: dict, micro_batch: int, seq_length: int) -> torch.Tensor | None:
    """The stored input at this run's micro-batch size (its rows are all equal), or None if the sequence length
    changed since it was saved."""
    text = record["text"]
    if text.shape[1] != seq_length + 1:
        return None
    return text[:1].repeat(micro_batch, 1)


def compare(ckpt_dir: Path, saved: float, now: float) -> str | None:
    """None if equal, a warning if close, else raise."""
    if saved == now:
        return None
    if math.isfinite(now) and abs(now - saved) <= ATOL + RTOL * abs(saved):
        return (f"checkpoint_validation_with_forward_pass: the forward pass after loading {ckpt_dir} gives loss "
                f"{now!r}, close to but not exactly the saved {saved!r}")
    raise CheckpointError(f"checkpoint_validation_with_forward_pass: the forward pass after loading {ckpt_dir} gives "
                          f"loss {now!r} but the checkpoint recorded {saved!r}: the weights loaded are not the ones "
                          "saved (a damaged checkpoint or a model/config change); resume from another checkpoint")

