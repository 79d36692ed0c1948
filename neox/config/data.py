"""Tokenizer and dataset keys (gpt-neox names)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from neox.config.errors import ConfigError
from neox.config.fields import option


@dataclass
class DataConfig:
    tokenizer_type: Literal[
        "HFTokenizer", "HFGPT2Tokenizer", "GPT2BPETokenizer", "SPMTokenizer", "CharLevelTokenizer", "TiktokenTokenizer"
    ] = option("GPT2BPETokenizer", "Tokenizer implementation (gpt-neox names).")
    vocab_file: str | None = option(
        None, "Tokenizer file: vocab.json (GPT2BPE), tokenizer.json (HF), .model (SPM) or a tiktoken encoding name."
    )
    merge_file: str | None = option(None, "merges.txt of a GPT-2 BPE tokenizer.")
    data_path: str | None = option(
        None, "Prefix of one preprocessed dataset (path without .bin/.idx), split by 'split' into train/valid/test."
    )
    train_data_paths: list[str] | None = option(None, "Training dataset prefixes (instead of data_path).")
    valid_data_paths: list[str] | None = option(None, "Validation dataset prefixes.")
    test_data_paths: list[str] | None = option(None, "Test dataset prefixes.")
    label_data_paths: list[str] | None = option(
        None, "Per-token label datasets aligned with train_data_paths (-100 masks a token out of the loss)."
    )
    train_data_weights: list[float] | None = option(None, "Sampling weight of each train dataset; None = equal.")
    valid_data_weights: list[float] | None = option(None, "Sampling weight of each validation dataset.")
    test_data_weights: list[float] | None = option(None, "Sampling weight of each test dataset.")
    weight_by_num_documents: bool = option(
        False, "Weight datasets by document count raised to weighted_sampler_alpha (overrides *_data_weights)."
    )
    weighted_sampler_alpha: float = option(0.3, "Exponent used by weight_by_num_documents.")
    split: str = option("969, 30, 1", "Train, valid, test proportions of data_path, e.g. '949,50,1'.")
    eod_mask_loss: bool = option(False, "Exclude end-of-document tokens from the loss.")
    data_impl: Literal["mmap", "infer"] = option(
        "mmap", "Indexed dataset format; only the mmap .bin/.idx format exists ('infer' means the same)."
    )
    data_cache_dir: str | None = option(
        None, "Where sample/shuffle index files are cached; None means next to each dataset."
    )
    num_workers: int = option(2, "Data loader worker processes per rank.")

    def validate(self) -> None:
        try:
            parts = [float(p) for p in self.split.replace("/", ",").split(",")]
        except ValueError:
            raise ConfigError(f"'split' must be comma-separated numbers like '969, 30, 1', got {self.split!r}")
        if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
            raise ConfigError(f"'split' needs 1 to 3 non-negative proportions with a positive sum, got {self.split!r}")
        if self.data_path is not None and self.train_data_paths is not None:
            raise ConfigError("set either 'data_path' or 'train_data_paths', not both")
        for stage in ("train", "valid", "test"):
            paths = getattr(self, f"{stage}_data_paths")
            weights = getattr(self, f"{stage}_data_weights")
            if weights is None:
                continue
            if paths is None or len(weights) != len(paths):
                raise ConfigError(
                    f"'{stage}_data_weights' needs one weight per entry of '{stage}_data_paths' "
                    f"({len(weights)} weights, {0 if paths is None else len(paths)} paths)"
                )
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(f"'{stage}_data_weights' must be non-negative with a positive sum")
        if self.label_data_paths is not None and (
            self.train_data_paths is None or len(self.label_data_paths) != len(self.train_data_paths)
        ):
            raise ConfigError("'label_data_paths' needs one entry per 'train_data_paths' entry")
        if self.tokenizer_type == "GPT2BPETokenizer" and (self.vocab_file is None) != (self.merge_file is None):
            raise ConfigError("'tokenizer_type' GPT2BPETokenizer needs both 'vocab_file' and 'merge_file'")
        if self.num_workers < 0:
            raise ConfigError(f"'num_workers' must be >= 0, got {self.num_workers}")
        if self.weighted_sampler_alpha <= 0:
            raise ConfigError(f"'weighted_sampler_alpha' must be positive, got {self.weighted_sampler_alpha}")
