"""LoRA as a user runs it: a tiny Llama (grouped-query attention) made by transformers, imported, fine-tuned with
`lora` through `deepy train` (one rank); its checkpoints hold only the adapters and name the base; a resume at tp2
(adapters split with their base layers) reloads base then adapters and continues as the one-rank run;
tools/convert_neox_to_hf.py --lora writes, from either layout's checkpoint, a PEFT adapter that
peft.PeftModel.from_pretrained on the original Hugging Face model turns into our logits, --merge a whole model that
gives them too."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from neox.checkpoint import load_model
from neox.checkpoint.errors import CheckpointError
from neox.checkpoint.hf_export import export_to_hf
from neox.checkpoint.hf_import import ImportOptions, convert_hf_to_neox
from neox.checkpoint.lora_base import BASE_FILE
from neox.checkpoint.safe_load import load_state_file
from tests.e2e.test_hf_convert import NEOX20B_VOCAB, SMALL, make_hf_model
from tests.e2e.train_helpers import deepy_train, max_relative_diff
from tools import convert_neox_to_hf, preprocess_data

pytestmark = pytest.mark.slow

LORA = {"r": 4, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]}
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"


def test_lora_finetune_saves_adapters_only_resumes_and_exports_to_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    make_hf_model(hf_dir, "LlamaConfig", dict(SMALL, vocab_size=NEOX20B_VOCAB, num_key_value_heads=2,
                                              tie_word_embeddings=False))
    base = convert_hf_to_neox(hf_dir, tmp_path / "base", ImportOptions(seq_length=32), progress=False)
    jsonl = tmp_path / "text.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"{i}: {TEXT}"}) + "\n" for i in range(32)))
    assert preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "text"), "--tokenizer-type",
                                 "HFTokenizer", "--vocab-file", str(base / "tokenizer" / "tokenizer.json"),
                                 "--append-eod"]) == 0
    config = yaml.safe_load((base / "model.yml").read_text())
    config.update({"data_path": str(tmp_path / "text_text_document"), "split": "100,0,0", "seq_length": 32,
                   "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_iters": 4,
                   "save_interval": 2, "lr_decay_style": "constant", "warmup": 0.0, "weight_decay": 0.0,
                   "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2}}, "eval_iters": 0, "log_interval": 1,
                   "peak_flops": 1.0e11, "num_workers": 0, "lora": LORA})
    (tmp_path / "lora.yml").write_text(yaml.safe_dump(config))

    run = deepy_train(tmp_path / "run", tmp_path / "lora.yml", num_gpus=1, zero_stage=1)
    assert f"train on the frozen base {base}" in run.output
    ckpt = run.save_dir / "global_step4"
    assert json.loads((ckpt / BASE_FILE).read_text()) == {"base": str(base)}
    module = load_state_file(ckpt / "mp_rank_00_model_states.pt")["module"]
    params = {k for k in module if not k.endswith("inv_freq")}
    assert params and all(k.rpartition(".")[2] in ("lora_A", "lora_B") for k in params), sorted(params)[:5]
    assert len(params) == 2 * 4 * 2  # A and B of query_key_value (q/k/v fused), dense, gate, linear2 in 2 layers
    saved = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.suffix in (".pt", ".safetensors"))
    base_bytes = (base / "model.safetensors").stat().st_size
    print(f"LoRA checkpoint: {saved:,} bytes of tensors vs the base's {base_bytes:,}")
    assert saved < base_bytes / 20

    # resume at step 2 at tp2 (base reloaded and split, then the adapters + Adam state from the layout-free copy):
    # steps 3 and 4 as the one-rank run's
    resumed = deepy_train(tmp_path / "resumed", tmp_path / "lora.yml", num_gpus=2, zero_stage=1,
                          extra={"load": str(run.save_dir), "finetune": False, "iteration": 2,
                                 "model_parallel_size": 2})
    worst = max_relative_diff({i: run.losses()[i] for i in (3, 4)}, resumed.losses())
    print(f"LoRA resume at tp2: worst relative lm_loss difference {worst:.1e}; losses {run.losses()}")
    assert worst < 1e-5 and run.losses()[4] < run.losses()[1]
    assert json.loads((resumed.save_dir / "global_step4" / BASE_FILE).read_text()) == {"base": str(base)}

    # exports: PEFT adapters (the CLI; tp1's and tp2's checkpoints) and the merged model, against our model
    # (consolidation merges the adapters into the base)
    with pytest.raises(CheckpointError, match="--lora.*--merge"):
        export_to_hf(run.save_dir, tmp_path / "plain", progress=False)
    assert convert_neox_to_hf.main(["--checkpoint", str(base), "--lora", "--output", str(tmp_path / "no")]) == 2
    exports = {"lora": run.save_dir, "merge": run.save_dir, "lora-tp2": resumed.save_dir}
    for name, save_dir in exports.items():  # the tool's own entry point, in this process
        flag = "--" + name.split("-")[0]
        assert convert_neox_to_hf.main(["--checkpoint", str(save_dir), flag, "--output", str(tmp_path / name),
                                        "--quiet"]) == 0
    adapter_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(hf_dir)

    def peft_on_original(adapter: str):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(hf_dir)), str(tmp_path / adapter))

    tokens = torch.randint(0, NEOX20B_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = {name: load_model(save_dir)[0](tokens)[..., :NEOX20B_VOCAB] for name, save_dir in
                (("tp1", run.save_dir), ("tp2", resumed.save_dir))}
        before = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()(input_ids=tokens).logits
        theirs = {"tp1": peft_on_original("lora"), "tp2": peft_on_original("lora-tp2"),
                  "merged": AutoModelForCausalLM.from_pretrained(str(tmp_path / "merge"))}
        logits = {name: model.eval()(input_ids=tokens).logits for name, model in theirs.items()}
    diffs = {name: (logits[name] - ours["tp1" if name == "merged" else name]).abs().max().item() for name in logits}
    moved, layouts = (before - ours["tp1"]).abs().max().item(), (ours["tp2"] - ours["tp1"]).abs().max().item()
    print(f"trained adapters move the logits by {moved:.3f} (tp2-resumed vs tp1 run: {layouts:.1e}); max |logit diff| "
          f"vs ours: PEFT tp1 {diffs['tp1']:.2e}, PEFT tp2 {diffs['tp2']:.2e}, merged {diffs['merged']:.2e}")
    assert moved > 1e-2 and layouts < 1e-3
    assert max(diffs.values()) < 1e-5
