"""Training-loop keys: iterations, batch sizes, checkpoints, evaluation cadence, seed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from neox.config.deepspeed_sections import check_sections
from neox.config.errors import ConfigError
from neox.config.fields import option
from neox.config.lora import lora_settings
from neox.config.s3 import check_s3_settings


@dataclass
class TrainConfig:
    train_iters: int | None = option(
        None, "Optimizer steps to train for; `deepy train` needs it or train_epochs. 0 trains nothing (evaluate only)."
    )
    train_epochs: int | None = option(
        None, "Train for this many passes over the train split instead of train_iters: train_iters = (samples in one "
        "epoch // (micro batch x data-parallel size)) x train_epochs // gradient_accumulation_steps, as gpt-neox. "
        "Not with train_iters, unequal train_data_weights, weight_by_num_documents or a pack_impl other than packed."
    )
    train_micro_batch_size_per_gpu: int | None = option(None, "Sequences per rank per forward/backward pass.")
    gradient_accumulation_steps: int | None = option(
        None, "Micro-batches accumulated per optimizer step; derived from the other two batch keys if unset."
    )
    train_batch_size: int | None = option(
        None, "Sequences per optimizer step = micro batch x accumulation x data-parallel size; any two give the third."
    )
    seed: int = option(1234, "Seed of python, numpy and torch RNGs (offset per rank where needed).")
    save: str | None = option(None, "Checkpoint directory; the resolved config is written here too.")
    load: str | None = option(
        None, "Checkpoint directory to resume (or, with finetune, to start) from; a missing or empty folder (or "
        "the run's own save) starts from scratch with a note, a file or any other folder is an error."
    )
    save_interval: int | None = option(
        None, "Save a checkpoint every this many iterations (and at the end): checkpoint_factor at linear scale."
    )
    checkpoint_factor: int | float | None = option(
        None, "Checkpoint spacing: with checkpoint_scale linear every multiple of it (20: 20, 40, ...); with log the "
        "powers of it from 1 (2: 1, 2, 4, 8, ...). The last iteration is always saved."
    )
    checkpoint_scale: Literal["linear", "log"] = option(
        "linear", "How checkpoint_factor spaces checkpoints: linear (multiples) or log (powers)."
    )
    extra_save_iters: list[int] | None = option(
        None, "More iterations to save at; 0 saves the initial weights before the first step of a fresh run."
    )
    save_iters: list[int] | None = option(
        None, "The exact iterations to save at (gpt-neox derives it from checkpoint_factor and extra_save_iters; a "
        "list given here is used instead of those). The last iteration is always saved."
    )
    keep_last_n_checkpoints: int | None = option(None, "Delete older checkpoints beyond this many; None keeps all.")
    no_save_optim: bool = option(
        False, "Checkpoints hold the fp32 weights only (layout_free/), no optimizer state; resuming one starts a fresh "
        "optimizer and LR schedule at the saved iteration and data position."
    )
    no_save_rng: bool = option(
        False, "Do not save the ranks' RNG states; resuming reseeds dropout from seed and iteration."
    )
    iteration: int | None = option(
        None, "Checkpoint iteration to load (global_step{N} under 'load') for train, eval and generate; None: the "
        "latest complete one. eval_iteration is the same key."
    )
    no_load_optim: bool = option(
        False, "Resume the weights, iteration and data position but not the optimizer: a fresh optimizer and, as in "
        "gpt-neox (which loads the two together), a fresh LR schedule."
    )
    no_load_rng: bool = option(
        False, "Do not restore the ranks' RNG states on resume; dropout is reseeded from seed and iteration. "
        "Without it a rank's missing RNG file is an error."
    )
    checkpoint_layout_free: bool = option(
        True, "Also write a layout-free copy (fp32 weights + Adam moments, ~3x the fp32 parameters) into every "
        "checkpoint so any tp/pp/dp/ZeRO layout can resume it; false saves the space, and "
        "tools/reshard_checkpoint.py builds the copy later from DeepSpeed's files."
    )
    checkpoint_async: bool = option(
        False, "Write checkpoints in the background: a save only copies each rank's state to host memory (one extra "
        "copy of it while the write runs) and training continues; complete.json and `latest` move once every rank's "
        "files are durable (checked every step; the next save, a preemption stop and the end of training wait)."
    )
    finetune: bool = option(
        False, "Load only the model weights from 'load': fresh optimizer, scheduler and iteration 0."
    )
    lora: dict | None = option(
        None, "LoRA (neox's own key): {r: 8, alpha: 8, dropout: 0.0, target_modules: [query_key_value]} (defaults "
        "shown) adds low-rank adapters y += dropout(x) A^T B^T alpha/r to the named linears (ours: query_key_value, "
        "dense, linear1, gate, linear2; or Hugging Face's: q_proj+k_proj+v_proj, o_proj, up_proj, dense_h_to_4h, "
        "c_attn, ... or all-linear) and trains only them. Needs 'load': the base model with finetune: true, or a "
        "LoRA run's checkpoints to resume (they hold the adapters and name their base). "
        "tools/convert_neox_to_hf.py --lora exports a PEFT adapter, --merge the merged model."
    )
    preempt_exit_code: int = option(
        75,
        "Exit code of a run stopped by SIGTERM/SIGUSR1 after its checkpoint: 'requeue me'. 75 is EX_TEMPFAIL "
        "(sysexits.h, 'temporary failure, retry later'): apart from 0, 1 (crash), 2 (bad input) and 128+N "
        "(killed by signal N), so a requeue rule can match it alone.",
    )
    eval_interval: int = option(1000, "Evaluate on the validation set every this many iterations.")
    eval_iters: int = option(100, "Validation batches per evaluation.")
    exit_interval: int | None = option(
        None, "Exit (code 0) after the first iteration divisible by this, with the checkpoints the schedule gave "
        "so far: no final save or evaluation, as gpt-neox."
    )
    do_train: bool | None = option(
        None, "Run the training loop; None: when there is train data and train_iters > 0. false with 'load' "
        "evaluates the checkpoint only."
    )
    do_valid: bool | None = option(
        None, "Evaluate on the validation split (every eval_interval and at the end); None: when it has data and "
        "eval_iters > 0. false also skips building it."
    )
    do_test: bool | None = option(
        None, "Evaluate on the test split at the end; None: when it has data and eval_iters > 0."
    )
    checkpoint_validation_with_forward_pass: bool = option(
        False, "Store a forward pass (fixed tokens and their loss) with each checkpoint and repeat it after loading: "
        "a different loss stops the run."
    )
    config_files: dict | None = option(
        None, "Original YAML files, name -> text; `deepy train` fills it, and every checkpoint keeps them in configs/."
    )
    checkpoint: dict | None = option(
        None, "DeepSpeed's checkpoint section, e.g. {tag_validation: Warn|Ignore|Fail, load_universal: false, "
        "use_node_local_storage: false, parallel_write: {pipeline_stage: false}}."
    )
    s3_path: str | None = option(
        None, "s3://bucket/prefix: after each checkpoint is written, rank 0 uploads it to "
        "<s3_path>/<basename of save>/<tag>/ in the background (boto3 multipart; endpoint and credentials from "
        "the usual AWS_* variables); the run waits for the uploads at its end and reports any failure."
    )
    s3_chunk_size: int = option(104_857_600, "Bytes per part of the S3 multipart uploads (S3 allows 5 MiB to 5 GiB).")

    def validate(self) -> None:
        check_sections({"checkpoint": self.checkpoint})
        check_s3_settings(self.s3_path, self.s3_chunk_size, self.save)
        for key in (
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "train_batch_size",
            "save_interval",
            "keep_last_n_checkpoints",
            "eval_interval",
            "train_epochs",
            "exit_interval",
        ):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"'{key}' must be >= 1, got {value}")
        if self.eval_iters < 0:
            raise ConfigError(f"'eval_iters' must be >= 0, got {self.eval_iters}")
        if not 3 <= self.preempt_exit_code <= 125:
            raise ConfigError(f"'preempt_exit_code' must be 3-125 (0-2 mean done, crash and bad input; 126+ are "
                              f"the shell's and signal deaths'), got {self.preempt_exit_code}")
        if self.finetune and self.load is None:
            raise ConfigError("'finetune' needs 'load' (the checkpoint whose weights to start from)")
        if lora_settings(self.lora) is not None and self.load is None:
            raise ConfigError("'lora' trains adapters on a frozen base model: set 'load' to the base (a consolidated "
                              "or Hugging Face-imported model, or a neox or gpt-neox checkpoint) with 'finetune: "
                              "true', or to a LoRA run's save directory to resume it")
        self._validate_run_length()
        self._validate_checkpointing()

    def _validate_run_length(self) -> None:
        if self.train_iters is not None and self.train_iters < 0:
            raise ConfigError(f"'train_iters' must be >= 0, got {self.train_iters}")
        if self.train_iters is not None and self.train_epochs is not None:
            raise ConfigError("set 'train_iters' or 'train_epochs', not both (gpt-neox refuses both too)")

    def _validate_checkpointing(self) -> None:
        if self.iteration is not None and self.iteration < 0:
            raise ConfigError(f"'iteration' must be >= 0, got {self.iteration}")
        if self.iteration is not None and self.load is None:
            raise ConfigError(f"'iteration' ({self.iteration}) picks a checkpoint under 'load', which is not set")
        for key in ("extra_save_iters", "save_iters"):
            bad = [it for it in getattr(self, key) or [] if it < 0]
            if bad:
                raise ConfigError(f"'{key}' holds iterations, which are >= 0; got {bad}")
        factor = self.checkpoint_factor
        if factor is not None:
            if self.checkpoint_scale == "linear" and (factor < 1 or not float(factor).is_integer()):
                raise ConfigError(f"'checkpoint_factor' must be a whole number >= 1 with checkpoint_scale linear, "
                                  f"got {factor}")
            if self.checkpoint_scale == "log" and factor <= 1:
                raise ConfigError(f"'checkpoint_factor' must be > 1 with checkpoint_scale log, got {factor}")
        if self.save_interval is not None:
            if self.checkpoint_scale == "log":
                raise ConfigError("'save_interval' is a linear spacing but 'checkpoint_scale' is log; set "
                                  "'checkpoint_factor' instead")
            if factor is not None and factor != self.save_interval:
                raise ConfigError(f"'save_interval' ({self.save_interval}) and 'checkpoint_factor' ({factor}) are the "
                                  "same setting with different values; keep one")
        if self.save_iters is not None:
            others = [k for k in ("checkpoint_factor", "save_interval", "extra_save_iters")
                      if getattr(self, k) is not None]
            if others:
                raise ConfigError(f"'save_iters' lists the save iterations itself; it cannot be combined with "
                                  f"{', '.join(repr(k) for k in others)}")
        for name, text in (self.config_files or {}).items():
            if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
                raise ConfigError(f"'config_files' maps plain file names to their text; {name!r} is not a file name")
