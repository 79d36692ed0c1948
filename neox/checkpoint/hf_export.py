"""A neox checkpoint (any ZeRO stage, or consolidated) -> a Hugging Face model directory: config.json,
model.safetensors, generation_config.json and the tokenizer files, loadable by AutoModelForCausalLM,
AutoTokenizer and transformers.pipeline("text-generation").

The architecture follows the model options: learned positions -> GPT-2; MoE layers -> Qwen2-MoE with a shared
expert, else Mixtral; a sliding window -> Mistral; RMSNorm, a gated MLP or grouped-query attention -> Llama;
otherwise GPT-NeoX. neox.model.hf.check_exportable refuses, naming the key, any option the
chosen class cannot express, so an export never silently computes another function.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from neox.checkpoint.consolidated import checkpoint_tokenizer, consolidate, find_checkpoint, swap_into_place
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.hf_reward import export_pad_token_id, reward_hf_config, to_hf_reward_state_dict
from neox.checkpoint.hf_tokenizer import export_tokenizer
from neox.checkpoint.lora_base import base_of, is_lora_checkpoint
from neox.config.model import ModelConfig
from neox.model.hf import HF_CLASSES, check_exportable, model_cfg_to_hf_config, to_hf_state_dict
from neox.model.value_head import is_reward_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def choose_arch(cfg: ModelConfig) -> str:
    """The HF architecture whose family the options belong to (check_exportable then vets every option)."""
    if cfg.pos_emb == "learned":
        arch = "gpt2"
    elif cfg.moe_layer_indices:
        arch = "qwen2_moe" if cfg.moe_num_shared_experts else "mixtral"
    elif cfg.sliding_window_width is not None:
        arch = "mistral"
    elif cfg.norm == "rmsnorm" or cfg.gated_mlp or cfg.kv_heads != cfg.num_attention_heads:
        arch = "llama"
    else:
        arch = "gpt_neox"
    return check_exportable(cfg, arch)


def export_to_hf(checkpoint: str | Path, out_dir: str | Path, iteration: int | None = None, arch: str | None = None,
                 dtype: str = "float32", keep_padded_vocab: bool = False, progress: bool = True,
                 merge: bool = False, pad_token_id: int | None = None) -> Path:
    """merge: the checkpoint is a LoRA run's, exported as its base with the adapters merged in (a LoRA checkpoint
    is refused without it: its adapters alone export with neox.checkpoint.peft_export). A reward model (train_impl
    rm) exports as *ForSequenceClassification (neox/checkpoint/hf_reward.py), scoring with pad_token_id if given."""
    out_dir = Path(out_dir).expanduser().absolute()
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if out_dir.exists() and not _replaceable(out_dir):
        raise CheckpointError(f"{out_dir} exists and is not an earlier export (config.json + model.safetensors); "
                              "choose a new output directory")
    with tqdm(total=4, desc="neox -> hf", unit="step", disable=not progress) as steps:
        ckpt = find_checkpoint(checkpoint, iteration)
        _check_lora_choice(ckpt, merge)
        cfg, weights = consolidate(ckpt)  # a LoRA run's: its adapters merged into its base
        if cfg.mup.use_mup or cfg.mup.mup_rp_embedding_mult != 1.0:
            raise CheckpointError(f"{ckpt} is a muP model (use_mup / mup_rp_embedding_mult): its embedding, attention "
                                  "and readout multipliers have no place in Hugging Face's model classes, so an "
                                  "export would compute other logits; evaluate and generate with neox instead")
        tokenizer = checkpoint_tokenizer(ckpt, cfg)
        steps.update()
        arch = check_exportable(cfg.model, arch) if arch else choose_arch(cfg.model)
        vocab = cfg.model.padded_vocab_size if keep_padded_vocab else tokenizer.vocab_size
        reward = is_reward_model(cfg)
        if reward:
            hf_config = reward_hf_config(cfg.model, arch, vocab, None)
            hf_weights = to_hf_reward_state_dict(cfg.model, weights, arch, vocab)
        else:
            hf_config = model_cfg_to_hf_config(cfg.model, arch, vocab)
            hf_config.architectures = [HF_CLASSES[arch]]
            hf_weights = to_hf_state_dict(cfg.model, weights, arch, vocab)
        hf_config.dtype = dtype
        del weights
        if getattr(hf_config, "tie_word_embeddings", False):
            hf_weights.pop("lm_head.weight")  # the embedding; transformers re-ties it on load
        steps.update()

        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            tokens = _special_token_ids(tokenizer, export_tokenizer(tokenizer, tmp))
            if reward:  # the pad id decides which token Hugging Face scores
                tokens["pad_token_id"] = export_pad_token_id(tokens["pad_token_id"], tokens["eos_token_id"], vocab,
                                                             pad_token_id)
            for name, token_id in tokens.items():
                setattr(hf_config, name, token_id)
            hf_config.save_pretrained(str(tmp))
            if not reward:
                _generation_config(tokens).save_pretrained(str(tmp))
            tensors = {k: v.to(DTYPES[dtype]).contiguous().clone() for k, v in hf_weights.items()}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            steps.update()
            swap_into_place(tmp, out_dir)
            steps.update()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out_dir


def _check_lora_choice(ckpt: Path, merge: bool) -> None:
    if is_lora_checkpoint(ckpt) and not merge:
        raise CheckpointError(f"{ckpt} is a LoRA run's checkpoint (adapters on the base {base_of(ckpt)}): export the "
                              "adapters as a PEFT adapter directory with --lora, or the base with them merged in as "
                              "a whole model with --merge")
    if merge and not is_lora_checkpoint(ckpt):
        raise CheckpointError(f"--merge: {ckpt} is not a LoRA run's checkpoint (no adapters to merge); drop --merge")


def _special_token_ids(tokenizer, hf_tokenizer) -> dict[str, int | None]:
    """eos/bos/pad ids for config.json and generation_config.json: the exported tokenizer's own (an imported
    instruct model's end-of-turn token, say), falling back to our end-of-document token for eos."""
    eos = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else tokenizer.eod
    pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else tokenizer.pad
    return {"eos_token_id": eos, "bos_token_id": hf_tokenizer.bos_token_id, "pad_token_id": pad}


def _generation_config(tokens: dict[str, int | None]):
    from transformers import GenerationConfig

    pad = tokens["pad_token_id"] if tokens["pad_token_id"] is not None else tokens["eos_token_id"]
    return GenerationConfig(eos_token_id=tokens["eos_token_id"], bos_token_id=tokens["bos_token_id"],
                            pad_token_id=pad)


def _replaceable(path: Path) -> bool:
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return not names or {"config.json", "model.safetensors"} <= names
