"""Export a neox checkpoint (any ZeRO stage, or a consolidated model) as a Hugging Face model directory.

    python tools/convert_neox_to_hf.py --checkpoint runs/demo/checkpoints --output runs/demo-hf
    python tools/convert_neox_to_hf.py --checkpoint runs/demo/checkpoints --iteration 200 --output runs/demo-hf-200

--checkpoint is a training save directory (its `latest` complete checkpoint, or --iteration N), a global_stepN
directory or a consolidated directory; a checkpoint EleutherAI's gpt-neox wrote (global_stepN with configs/ and
layer_XX-model_YY or mp_rank_YY model files, at any tensor-parallel size) or its save directory is read too. Writes
config.json, generation_config.json, model.safetensors and the tokenizer files atomically, so
AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained and transformers.pipeline("text-generation")
load --output. The class is GPTNeoXForCausalLM, LlamaForCausalLM or GPT2LMHeadModel, chosen from the model options
(or --arch); an option it cannot express is an error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.hf_export import export_to_hf
from neox.checkpoint.hf_tokenizer import TokenizerConversionError
from neox.config.errors import ConfigError
from neox.tokenizer import TokenizerError

_INPUT_ERRORS = (CheckpointError, ConfigError, TokenizerError, TokenizerConversionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="training save directory, global_stepN directory or consolidated directory (neox's "
                             "or gpt-neox's)")
    parser.add_argument("--iteration", type=int, default=None, help="export global_step{N} of the save directory")
    parser.add_argument("--output", required=True, type=Path, help="directory to write the HF model to")
    parser.add_argument("--arch", choices=("gpt_neox", "llama", "gpt2"), default=None,
                        help="HF architecture (default: chosen from the model options)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the saved weights (default float32)")
    parser.add_argument("--keep-padded-vocab", action="store_true",
                        help="keep the padded vocabulary rows (default: trim to the tokenizer's vocab size)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_to_hf(args.checkpoint, args.output, iteration=args.iteration, arch=args.arch, dtype=args.dtype,
                           keep_padded_vocab=args.keep_padded_vocab, progress=not args.quiet)
    except _INPUT_ERRORS as err:
        print(f"convert_neox_to_hf: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
