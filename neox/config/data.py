"""Tokenizer and dataset keys (gpt-neox names)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from neox.config.curriculum import check_curriculum
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
    train_label_data_paths: list[str] | None = option(
        None, "Per-token label datasets, the i-th for the i-th train_data_paths entry (later entries have none); "
        "not shifted, negative labels (e.g. -100) leave a token out of the loss.")
    valid_label_data_paths: list[str] | None = option(
        None, "Per-token label datasets, the i-th for the i-th valid_data_paths entry.")
    test_label_data_paths: list[str] | None = option(
        None, "Per-token label datasets, the i-th for the i-th test_data_paths entry.")
    label_data_paths: list[str] | None = option(
        None, "Older name of train_label_data_paths (the same list; setting both to different lists is an error)."
    )
    train_reward_data_paths: list[str] | None = option(
        None, "Per-document reward datasets (preprocess_data_with_chat_template.py --reward-key), the i-th for the "
        "i-th train_data_paths entry; each batch then carries the document's reward at each of its tokens "
        "(train_impl kto: > 0 desirable, < 0 undesirable).")
    valid_reward_data_paths: list[str] | None = option(
        None, "Per-document reward datasets, the i-th for the i-th valid_data_paths entry.")
    test_reward_data_paths: list[str] | None = option(
        None, "Per-document reward datasets, the i-th for the i-th test_data_paths entry.")
    dataset_impl: Literal["gpt2", "pairwise", "online"] = option(
        "gpt2", "gpt2: samples from train/valid/test_data_paths (or data_path); pairwise: chosen/rejected pairs from "
        "pos_* and neg_*_data_paths, the k-th document of one with the k-th of the other, one pair per sample "
        "(pack_impl unpacked); 'online' is not available here.")
    train_impl: Literal["normal", "dpo", "rm", "kto", "reinforce"] = option(
        "normal", "The objective (neox/train/objectives): normal = next-token cross entropy (on the unmasked labels "
        "only, with label datasets: SFT), the mean over the global batch's unmasked tokens; dpo, rm (pairwise data), "
        "kto (reward data); 'reinforce' is not available here.")
    pos_train_data_paths: list[str] | None = option(
        None, "dataset_impl pairwise: chosen (positive) datasets, the i-th paired with the i-th neg_train_data_paths "
        "entry document by document.")
    neg_train_data_paths: list[str] | None = option(
        None, "dataset_impl pairwise: rejected (negative) datasets, the i-th paired with pos_train_data_paths[i].")
    pos_train_label_data_paths: list[str] | None = option(
        None, "Label datasets of pos_train_data_paths (-100 = not trained); set with neg_train_label_data_paths.")
    neg_train_label_data_paths: list[str] | None = option(
        None, "Label datasets of neg_train_data_paths (-100 = not trained); set with pos_train_label_data_paths.")
    pos_valid_data_paths: list[str] | None = option(None, "dataset_impl pairwise: chosen validation datasets.")
    neg_valid_data_paths: list[str] | None = option(None, "dataset_impl pairwise: rejected validation datasets.")
    pos_valid_label_data_paths: list[str] | None = option(None, "Label datasets of pos_valid_data_paths.")
    neg_valid_label_data_paths: list[str] | None = option(None, "Label datasets of neg_valid_data_paths.")
    pos_test_data_paths: list[str] | None = option(None, "dataset_impl pairwise: chosen test datasets.")
    neg_test_data_paths: list[str] | None = option(None, "dataset_impl pairwise: rejected test datasets.")
    pos_test_label_data_paths: list[str] | None = option(None, "Label datasets of pos_test_data_paths.")
    neg_test_label_data_paths: list[str] | None = option(None, "Label datasets of neg_test_data_paths.")
    train_data_weights: list[float] | None = option(None, "Sampling weight of each train dataset; None = equal.")
    valid_data_weights: list[float] | None = option(None, "Sampling weight of each validation dataset.")
    test_data_weights: list[float] | None = option(None, "Sampling weight of each test dataset.")
    weight_by_num_documents: bool = option(
        False, "Blend the train/valid/test datasets by their document counts n: p = (n/N)^alpha normalised, times "
        "(1 - n/N), normalised (gpt-neox's weights_by_num_docs); replaces *_data_weights."
    )
    weighted_sampler_alpha: float = option(
        1.0, "Exponent alpha of weight_by_num_documents: 1 follows the document counts, towards 0 evens them out."
    )
    split: str = option("969, 30, 1", "Train, valid, test proportions of data_path, e.g. '949,50,1'.")
    eod_mask_loss: bool = option(False, "Exclude end-of-document tokens from the loss.")
    data_impl: Literal["infer", "mmap", "cached"] = option(
        "infer", "Indexed dataset format: mmap (MMIDIDX .idx), cached (the older TNTIDX .idx), or infer from the "
        ".idx header."
    )
    pack_impl: Literal["packed", "pack_until_overflow", "unpacked"] = option(
        "packed", "packed: samples run across documents; pack_until_overflow: whole documents until the next would "
        "overflow seq_length + 1, then padding; unpacked: one document per sample, padded (padding is not trained)."
    )
    allow_chopped: bool = option(
        True, "pack_until_overflow/unpacked: keep documents longer than seq_length + 1 cut to that length (false "
        "skips them); no effect with packed."
    )
    mmap_warmup: bool = option(False, "Read every dataset's .idx and .bin once at start to fill the page cache.")
    use_shared_fs: bool = option(
        True, "Data and index caches are on a file system every node sees: global rank 0 builds the caches; false: "
        "local rank 0 of each node builds its own."
    )
    short_seq_prob: float = option(
        0.1, "No effect, as in gpt-neox, whose GPT data never reads it (Megatron's BERT/T5 short-sequence "
        "probability); accepted so its configs load."
    )
    curriculum_learning: dict | None = option(
        None, "DeepSpeed curriculum section (enabled, curriculum_type seqlen, min/max_difficulty, schedule_type, "
        "schedule_config): training batches are cut to the scheduled sequence length."
    )
    curriculum_seqlen: int = option(
        0, "gpt-neox's internal record of the current curriculum length; logged as curriculum_seqlen, a value "
        "given here has no effect."
    )
    char_level_ppl: bool = option(
        False, "Also report character-level perplexity, exp(loss x tokens/characters) of the evaluated text, in "
        "validation/test records and the perplexity eval task."
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
        self._validate_pairwise()
        for stage in ("train", "valid", "test"):
            paths_key = f"{'pos_' if self.dataset_impl == 'pairwise' else ''}{stage}_data_paths"
            paths = getattr(self, paths_key)
            weights = getattr(self, f"{stage}_data_weights")
            if weights is None:
                continue
            if paths is None or len(weights) != len(paths):
                raise ConfigError(
                    f"'{stage}_data_weights' needs one weight per entry of '{paths_key}' "
                    f"({len(weights)} weights, {0 if paths is None else len(paths)} paths)"
                )
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(f"'{stage}_data_weights' must be non-negative with a positive sum")
        self._merge_label_alias()
        for stage in ("train", "valid", "test"):
            labels = getattr(self, f"{stage}_label_data_paths")
            paths = getattr(self, f"{stage}_data_paths")
            # gpt-neox pairs the lists by position (zip_longest): data paths past the last label have none.
            if labels and (paths is None or len(labels) > len(paths)):
                raise ConfigError(
                    f"'{stage}_label_data_paths' gives the label dataset of each '{stage}_data_paths' entry by "
                    f"position, but has {len(labels)} entries for {0 if paths is None else len(paths)} data paths; "
                    f"labels go with '{stage}_data_paths', not with 'data_path'")
        for stage in ("train", "valid", "test"):
            rewards, paths = getattr(self, f"{stage}_reward_data_paths"), getattr(self, f"{stage}_data_paths")
            if rewards and (paths is None or len(rewards) > len(paths)):
                raise ConfigError(
                    f"'{stage}_reward_data_paths' gives the reward dataset of each '{stage}_data_paths' entry by "
                    f"position, but has {len(rewards)} entries for {0 if paths is None else len(paths)} data paths")
        if self.train_impl in ("dpo", "rm") and self.dataset_impl != "pairwise":
            raise ConfigError(f"train_impl {self.train_impl} scores chosen/rejected pairs: set dataset_impl: pairwise "
                              "with pos_*/neg_*_data_paths")
        if self.train_impl in ("normal", "kto") and self.dataset_impl == "pairwise":
            raise ConfigError(f"train_impl {self.train_impl} reads single samples, not pairs: dataset_impl pairwise "
                              "goes with train_impl dpo or rm")
        if self.weight_by_num_documents and self.data_path is not None:
            raise ConfigError("'weight_by_num_documents' weights the datasets of train/valid/test_data_paths; with "
                              "'data_path' there is one dataset and nothing to weight")
        if self.tokenizer_type == "GPT2BPETokenizer" and (self.vocab_file is None) != (self.merge_file is None):
            raise ConfigError("'tokenizer_type' GPT2BPETokenizer needs both 'vocab_file' and 'merge_file'")
        if self.num_workers < 0:
            raise ConfigError(f"'num_workers' must be >= 0, got {self.num_workers}")
        if self.weighted_sampler_alpha <= 0:
            raise ConfigError(f"'weighted_sampler_alpha' must be positive, got {self.weighted_sampler_alpha}")
        check_curriculum(self.curriculum_learning)

    def _validate_pairwise(self) -> None:
        """dataset_impl picks which path lists are read; the other kind would be silently ignored, so it is refused."""
        pairwise_keys = [f"{side}_{stage}_{kind}data_paths" for stage in ("train", "valid", "test")
                         for side in ("pos", "neg") for kind in ("", "label_")]
        if self.dataset_impl != "pairwise":
            given = [k for k in pairwise_keys if getattr(self, k)]
            if given:
                raise ConfigError(f"'{given[0]}' is read with dataset_impl pairwise only (dataset_impl is "
                                  f"{self.dataset_impl!r}): set dataset_impl: pairwise, or use train_data_paths")
            return
        for key in ("data_path", "train_data_paths", "valid_data_paths", "test_data_paths",
                    "train_label_data_paths", "label_data_paths", "train_reward_data_paths",
                    "valid_reward_data_paths", "test_reward_data_paths"):
            if getattr(self, key):
                raise ConfigError(f"dataset_impl pairwise reads pos_*/neg_*_data_paths; '{key}' would be ignored: "
                                  "remove it")
        if self.char_level_ppl:
            raise ConfigError("'char_level_ppl' measures the text of single samples; dataset_impl pairwise reads "
                              "chosen/rejected pairs: unset it")
        if self.pack_impl != "unpacked":
            raise ConfigError(f"dataset_impl pairwise needs pack_impl: unpacked (one chosen/rejected pair per sample, "
                              f"what dpo and rm score), got {self.pack_impl!r}")
        for stage in ("train", "valid", "test"):
            pos, neg = getattr(self, f"pos_{stage}_data_paths"), getattr(self, f"neg_{stage}_data_paths")
            if len(pos or []) != len(neg or []):
                raise ConfigError(f"'pos_{stage}_data_paths' ({len(pos or [])} entries) and 'neg_{stage}_data_paths' "
                                  f"({len(neg or [])}) must pair up one to one")
            pos_labels = getattr(self, f"pos_{stage}_label_data_paths")
            neg_labels = getattr(self, f"neg_{stage}_label_data_paths")
            if bool(pos_labels) != bool(neg_labels):
                raise ConfigError(f"'pos_{stage}_label_data_paths' and 'neg_{stage}_label_data_paths' are set together "
                                  "(both sides masked, or neither)")
            if pos_labels and (len(pos_labels) != len(pos or []) or len(neg_labels) != len(neg or [])):
                raise ConfigError(f"'pos_{stage}_label_data_paths'/'neg_{stage}_label_data_paths' need one label "
                                  f"prefix per entry of 'pos_{stage}_data_paths'/'neg_{stage}_data_paths'")

    def _merge_label_alias(self) -> None:
        """label_data_paths (our older key) and train_label_data_paths (gpt-neox's) are one list."""
        old, new = self.label_data_paths, self.train_label_data_paths
        if old is not None and new is not None and old != new:
            raise ConfigError("'label_data_paths' and 'train_label_data_paths' are the same list under two names "
                              f"but differ ({old} vs {new}); keep one of them")
        self.train_label_data_paths = new if new is not None else old
