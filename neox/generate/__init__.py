"""Text generation: sampling rules (sampling.py), the batched KV-cache decoding loop (decode.py), prompt and
sample files (samples_io.py) and the per-rank program `python -m neox.generate` (run.py)."""
from neox.generate.decode import (
    Continuation,
    DecodeRequest,
    GenerationError,
    StopStrings,
    TokenSync,
    decode,
    left_pad,
)
from neox.generate.sampling import SamplingError, SamplingParams, filter_logits, sample_next, seeded_generators

__all__ = [
    "Continuation",
    "DecodeRequest",
    "GenerationError",
    "SamplingError",
    "SamplingParams",
    "StopStrings",
    "TokenSync",
    "decode",
    "filter_logits",
    "left_pad",
    "sample_next",
    "seeded_generators",
]
