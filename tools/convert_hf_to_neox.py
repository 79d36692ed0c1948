"""Import a local Hugging Face GPTNeoX (Pythia), GPT-2, Llama, Mistral, Mixtral or Qwen2-MoE model as a neox model
ready to fine-tune.

    python tools/convert_hf_to_neox.py --hf path/to/hf_model --output runs/pythia-160m
    python tools/convert_hf_to_neox.py --hf DIR --gguf-file model.Q4_1.gguf --output runs/smollm2
    python launcher/deepy.py train runs/pythia-160m/model.yml my_data.yml

Reads safetensors, pytorch_model.bin (torch.load weights_only=True) or, with --gguf-file, a GGUF file through
transformers (dequantised to fp32). Writes the consolidated neox format (model.safetensors in neox naming,
config.yml, tokenizer/, complete.json) and model.yml (architecture + tokenizer + `load`/`finetune: true`) into
--output, atomically. --tp / --pp set the tensor / pipeline sizes model.yml trains at; the weights themselves are
layout-free (the trainer loads them into the full model before it is split).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.hf_import import MODEL_YAML, ImportOptions, convert_hf_to_neox
from neox.checkpoint.hf_tokenizer import TokenizerConversionError
from neox.config.errors import ConfigError
from neox.tokenizer import TokenizerError

_INPUT_ERRORS = (CheckpointError, ConfigError, TokenizerError, TokenizerConversionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, type=Path,
                        help="Hugging Face model directory (config.json + weights + tokenizer files), or a .gguf file")
    parser.add_argument("--output", required=True, type=Path, help="directory to write the neox model to")
    parser.add_argument("--gguf-file", default=None, help="name of a GGUF file inside --hf to read instead")
    parser.add_argument("--tp", type=int, default=1, help="model_parallel_size written to model.yml (default 1)")
    parser.add_argument("--pp", type=int, default=0, help="pipe_parallel_size written to model.yml (default 0)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary to a multiple of this x tp (default 128)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="seq_length written to model.yml (default: the model's max_position_embeddings)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hf, gguf = args.hf, args.gguf_file
    if gguf is None and hf.suffix == ".gguf":
        hf, gguf = hf.parent, hf.name
    opts = ImportOptions(tp=args.tp, pp=args.pp, gguf_file=gguf,
                         make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, seq_length=args.seq_length)
    try:
        out = convert_hf_to_neox(hf, args.output, opts, progress=not args.quiet)
    except _INPUT_ERRORS as err:
        print(f"convert_hf_to_neox: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}\nfine-tune with: python launcher/deepy.py train {out / MODEL_YAML} my_data.yml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
