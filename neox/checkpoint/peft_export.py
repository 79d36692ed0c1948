"""A LoRA run's checkpoint -> a PEFT adapter directory: adapter_config.json and adapter_model.safetensors, which
peft.PeftModel.from_pretrained(base, DIR) loads onto the base as a Hugging Face model (the imported model itself, or
the base exported with tools/convert_neox_to_hf.py) and then computes the logits our adapted model does.

base_model_name_or_path is the Hugging Face directory the base was imported from when its consolidated copy records
one, else the base's own directory (or what --base-model says). Names and the fused q/k/v mapping:
neox/model/hf_lora.py. Written under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from neox.checkpoint.consolidated import find_checkpoint, lora_adapters, swap_into_place
from neox.checkpoint.engine_state import completion_record
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.hf_export import DTYPES, choose_arch
from neox.config.lora import LoraSettings, lora_settings
from neox.config.model import ModelConfig
from neox.model.hf import check_exportable
from neox.model.hf_lora import peft_config, to_peft_state_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def export_peft_adapter(checkpoint: str | Path, out_dir: str | Path, iteration: int | None = None,
                        arch: str | None = None, dtype: str = "float32", base_model: str | None = None) -> Path:
    out_dir = Path(out_dir).expanduser().absolute()
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    replaceable = out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / CONFIG_FILE).is_file())
    if out_dir.exists() and not replaceable:
        raise CheckpointError(f"{out_dir} exists and is not an earlier adapter export ({CONFIG_FILE}); choose a new "
                              "output directory")
    ckpt = find_checkpoint(checkpoint, iteration)
    cfg, adapters, base_dir = lora_adapters(ckpt)
    arch = check_exportable(cfg.model, arch) if arch else choose_arch(cfg.model)
    name = base_model or completion_record(base_dir).get("source") or str(base_dir)
    return write_peft_adapter(out_dir, cfg.model, lora_settings(cfg.train.lora), adapters, arch, name, dtype)


def write_peft_adapter(out_dir: Path, model_cfg: ModelConfig, settings: LoraSettings,
                       adapters: dict[str, torch.Tensor], arch: str, base_model: str, dtype: str = "float32") -> Path:
    """Our adapters (single-device names) as a PEFT adapter directory for the HF class `arch`, atomically."""
    tensors = {k: v.to(DTYPES[dtype]) for k, v in to_peft_state_dict(model_cfg, settings, adapters, arch).items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(settings, arch, base_model), indent=2) + "\n",
                                       encoding="utf-8")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
