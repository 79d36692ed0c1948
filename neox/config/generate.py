"""Text generation keys (gpt-neox names); read by the generate entrypoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from neox.config.errors import ConfigError
from neox.config.fields import option


@dataclass
class GenerateConfig:
    text_gen_type: Literal["unconditional", "input-file", "interactive", "precompute"] | None = option(
        None, "Generation mode: unconditional, input-file (prompts of sample_input_file), interactive (stdin), or "
        "precompute (no sampling: the `load` model's per-token log-probs of every train/valid/test data document, "
        "written next to the data as {prefix}_{precompute_model_name}, the reference of a dpo run); unset: "
        "input-file when sample_input_file is given, else unconditional."
    )
    sample_input_file: str | None = option(
        None, "Prompts for input-file mode: text split on prompt_end (one per line), or jsonl with a prompt/text key."
    )
    sample_output_file: str = option(
        "samples.txt", "Where samples are written, one JSON object per line: prompt, text (the continuation), "
        "tokens_generated, finish_reason (eod/stop/length), seconds, tokens."
    )
    num_samples: int = option(1, "Samples to generate in unconditional mode (each seeded by seed and its index).")
    maximum_tokens: int = option(64, "Maximum new tokens per sample.")
    prompt_end: str = option("\n", "Separator that ends one prompt in interactive/input-file mode.")
    temperature: float = option(0.0, "Softmax temperature; 0 means greedy decoding.")
    top_k: int = option(0, "Sample from the k most likely tokens; 0 disables.")
    top_p: float = option(0.0, "Nucleus sampling probability mass; 0 disables.")
    recompute: bool = option(False, "Recompute the whole sequence each step instead of using the KV cache.")
    return_logits: bool = option(False, "Also write the logit of each generated token ('logits' in the output).")
    stop_strings: list[str] | None = option(
        None, "A sample ends once its continuation contains one of these strings (cut before it); EOD always ends it."
    )
    generate_batch_size: int = option(
        8, "Prompts decoded together as one left-padded batch (input-file and unconditional modes)."
    )
    decode_precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "Weight dtype for generate. auto: the training 'precision' on GPU, fp32 on CPU. bf16 on a CPU "
        "with AMX/AVX512-BF16 halves the weight bytes a decode step reads (batch-1 decoding is memory-bound): "
        "~1.3x tokens/s here, outputs agree with fp32 only to bf16 rounding."
    )

    def validate(self) -> None:
        if self.text_gen_type == "input-file" and self.sample_input_file is None:
            raise ConfigError("'text_gen_type' input-file needs 'sample_input_file'")
        if self.num_samples < 1 or self.maximum_tokens < 1:
            raise ConfigError("'num_samples' and 'maximum_tokens' must be >= 1")
        if self.generate_batch_size < 1:
            raise ConfigError(f"'generate_batch_size' must be >= 1, got {self.generate_batch_size}")
        if self.stop_strings is not None and any(s == "" for s in self.stop_strings):
            raise ConfigError("'stop_strings' must not contain an empty string")
        if self.temperature < 0:
            raise ConfigError(f"'temperature' must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"'top_k' must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"'top_p' must be in [0, 1], got {self.top_p}")
