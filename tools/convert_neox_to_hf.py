"""Export a neox checkpoint (any ZeRO stage, or a consolidated model) as a Hugging Face model directory.

    python tools/convert_neox_to_hf.py --checkpoint runs/demo/checkpoints --output runs/demo-hf
    python tools/convert_neox_to_hf.py --checkpoint runs/demo/checkpoints --iteration 200 --output runs/demo-hf-200

--checkpoint is a training save directory (its `latest` complete checkpoint, or --iteration N), a global_stepN
directory or a consolidated directory; a checkpoint EleutherAI's gpt-neox wrote (global_stepN with configs/ and
layer_XX-model_YY or mp_rank_YY model files, at any tensor-parallel size) or its save directory is read too. Writes
config.json, generation_config.json, model.safetensors and the tokenizer files atomically, so
AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained and transformers.pipeline("text-generation")
load --output. The class is GPTNeoXForCausalLM, LlamaForCausalLM, GPT2LMHeadModel, MistralForCausalLM (a sliding
window), MixtralForCausalLM or Qwen2MoeForCausalLM (MoE layers, without / with a shared expert), chosen from the model
options (or --arch); an option it cannot express is an error. A reward model (train_impl rm) is written as
GPTNeoXForSequenceClassification / LlamaForSequenceClassification / GPT2ForSequenceClassification with num_labels 1
(AutoModelForSequenceClassification loads it; --pad-token-id sets the id it pads with).

A LoRA run's checkpoint (trained with `lora`) exports either way:
    python tools/convert_neox_to_hf.py --checkpoint runs/lora/checkpoints --lora --output runs/lora-adapter
    python tools/convert_neox_to_hf.py --checkpoint runs/lora/checkpoints --merge --output runs/lora-merged
--lora writes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for
peft.PeftModel.from_pretrained(base, DIR), the base being the Hugging Face model it was imported from (or the base
checkpoint exported by this tool); --merge writes the base with the adapters merged in, as a whole model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.hf_export import export_to_hf
from neox.checkpoint.hf_tokenizer import TokenizerConversionError
from neox.checkpoint.peft_export import export_peft_adapter
from neox.model.hf import ARCHES
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
    parser.add_argument("--arch", choices=ARCHES, default=None,
                        help="HF architecture (default: chosen from the model options)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the saved weights (default float32)")
    parser.add_argument("--keep-padded-vocab", action="store_true",
                        help="keep the padded vocabulary rows (default: trim to the tokenizer's vocab size)")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--lora", action="store_true",
                      help="a LoRA run's checkpoint: write its adapters as a PEFT adapter directory")
    lora.add_argument("--merge", action="store_true",
                      help="a LoRA run's checkpoint: write its base with the adapters merged in, as a whole model")
    parser.add_argument("--base-model", default=None,
                        help="with --lora: base_model_name_or_path to record (default: the Hugging Face directory the "
                             "base was imported from, else the base checkpoint)")
    parser.add_argument("--pad-token-id", type=int, default=None,
                        help="a reward model (train_impl rm): the pad id of its *ForSequenceClassification config, "
                             "which decides the token Hugging Face scores (default: the tokenizer's pad token if it "
                             "is not end-of-text, else unset)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.base_model is not None and not args.lora:
        print("convert_neox_to_hf: error: --base-model names the base of a PEFT adapter: use it with --lora",
              file=sys.stderr)
        return 2
    try:
        if args.lora:
            out = export_peft_adapter(args.checkpoint, args.output, iteration=args.iteration, arch=args.arch,
                                      dtype=args.dtype, base_model=args.base_model)
        else:
            out = export_to_hf(args.checkpoint, args.output, iteration=args.iteration, arch=args.arch,
                               dtype=args.dtype, keep_padded_vocab=args.keep_padded_vocab, progress=not args.quiet,
                               merge=args.merge, pad_token_id=args.pad_token_id)
    except _INPUT_ERRORS as err:
        print(f"convert_neox_to_hf: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
