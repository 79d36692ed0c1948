"""Text generation keys (gpt-neox names); read by the generate entrypoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from neox.config.errors import ConfigError
from neox.config.fields import option


@dataclass
class GenerateConfig:
    text_gen_type: Literal["unconditional", "input-file", "interactive"] | None = option(
        None, "Generation mode: unconditional, input-file (one prompt per line of sample_input_file) or interactive."
    )
    sample_input_file: str | None = option(None, "Prompts, one per line, for text_gen_type input-file.")
    sample_output_file: str = option("samples.txt", "Where generated samples are written (jsonl).")
    num_samples: int = option(1, "Samples to generate in unconditional mode.")
    maximum_tokens: int = option(64, "Maximum new tokens per sample.")
    prompt_end: str = option("\n", "Separator that ends one prompt in interactive/input-file mode.")
    temperature: float = option(0.0, "Softmax temperature; 0 means greedy decoding.")
    top_k: int = option(0, "Sample from the k most likely tokens; 0 disables.")
    top_p: float = option(0.0, "Nucleus sampling probability mass; 0 disables.")
    recompute: bool = option(False, "Recompute the whole sequence each step instead of using the KV cache.")
    return_logits: bool = option(False, "Also return the logits of generated tokens.")

    def validate(self) -> None:
        if self.text_gen_type == "input-file" and self.sample_input_file is None:
            raise ConfigError("'text_gen_type' input-file needs 'sample_input_file'")
        if self.num_samples < 1 or self.maximum_tokens < 1:
            raise ConfigError("'num_samples' and 'maximum_tokens' must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"'temperature' must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"'top_k' must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"'top_p' must be in [0, 1], got {self.top_p}")
