"""tools/preprocess_data_with_chat_template.py and tools/preprocess_data_with_mask.py, run in process as a user runs
them, their shards re-read and checked against references that do not share their code: transformers' own assistant
mask (apply_chat_template(return_assistant_tokens_mask=True) on a template with {% generation %} markers) for the
chat tool, the HF `tokenizers` library for the mask tool."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from conftest import NEOX20B_TOKENIZER
from neox.data.indexed import IndexedDataset
from tests.distributed.sft_checks import write_chat_tokenizer
from tools import preprocess_data_with_chat_template as chat_tool
from tools import preprocess_data_with_mask as mask_tool

EOS = 0  # <|endoftext|> of the neox-20b tokenizer
# CHAT_TEMPLATE's rendering, with transformers' markers around what an assistant-only loss trains.
MARKED_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}"
                   "{{ m['content'] }}<|endoftext|>\n{% endgeneration %}{% else %}<|{{ m['role'] }}|>\n"
                   "{{ m['content'] }}<|endoftext|>\n{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATS = [
    [("system", "Answer briefly."), ("user", "Name a colour."), ("assistant", "Blue."), ("user", "Another one?"),
     ("assistant", "Red, as in the morning sky.")],
    [("user", "Who begat Enos?"), ("assistant", "Seth begat Enos.")],
    [("user", "Say yes."), ("assistant", "Yes."), ("user", "Thanks.")],  # ends on a user turn: its EOS is masked
]


def messages(chat) -> list[dict]:
    return [{"role": role, "content": content} for role, content in chat]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_chat_tokenizer(tmp_path_factory.mktemp("chat") / "tokenizer")


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read(prefix: str | Path) -> list[list[int]]:
    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def run_chat(tmp_path: Path, tokenizer_dir: Path, rows: list[dict], *flags: str, name: str = "out") -> int:
    return chat_tool.main(["--input", str(write_jsonl(tmp_path / f"{name}.jsonl", rows)),
                           "--tokenizer-path", str(tokenizer_dir), "--output-prefix", str(tmp_path / name), *flags])


def test_chat_labels_train_exactly_the_assistant_tokens_transformers_marks(tmp_path, tokenizer_dir, reference):
    assert run_chat(tmp_path, tokenizer_dir, [{"messages": messages(c)} for c in CHATS], "--jsonl-keys",
                    "messages") == 0
    tokens, labels = read(tmp_path / "out_messages_document"), read(tmp_path / "out_messages_label_document")
    assert len(tokens) == len(CHATS)
    for chat, doc, label in zip(CHATS, tokens, labels):
        marked = reference.apply_chat_template(messages(chat), chat_template=MARKED_TEMPLATE, tokenize=True,
                                               return_dict=True, return_assistant_tokens_mask=True)
        # The whole render, then gpt-neox's appended EOS (trained when the chat ends on an assistant turn).
        assert doc == marked["input_ids"] + [EOS]
        assert [t >= 0 for t in label[:-1]] == [bool(m) for m in marked["assistant_masks"]]
        assert all(t == d for t, d in zip(label, doc) if t >= 0)
        assert (label[-1] == EOS) == (chat[-1][0] == "assistant") and (label[-1] < 0) == (chat[-1][0] != "assistant")


def test_chat_only_last_no_mask_and_rewards(tmp_path, tokenizer_dir, reference):
    rows = [{"messages": messages(CHATS[0]), "score": 3}, {"messages": messages(CHATS[1]), "score": -2}]
    assert run_chat(tmp_path, tokenizer_dir, rows, "--jsonl-keys", "messages", "--only-last", "--reward-key",
                    "score", name="last") == 0
    doc, label = read(tmp_path / "last_messages_document")[0], read(tmp_path / "last_messages_label_document")[0]
    trained = [t for t in label if t >= 0]
    assert reference.decode(trained) == "Red, as in the morning sky.<|endoftext|>\n<|endoftext|>"
    assert read(tmp_path / "last_messages_reward_document") == [[3], [-2]]

    assert run_chat(tmp_path, tokenizer_dir, rows[:1], "--jsonl-keys", "messages", "--no-mask", name="all") == 0
    everything = reference.apply_chat_template(messages(CHATS[0]), tokenize=True, return_dict=False)
    assert read(tmp_path / "all_messages_document") == [everything] == read(tmp_path / "all_messages_label_document")
    assert len(doc) == len(everything) + 1


def test_chat_pairs_for_reward_models_and_binary_rewards(tmp_path, tokenizer_dir, reference):
    rows = [{"chosen": messages(CHATS[1]), "rejected": messages([CHATS[1][0], ("assistant", "Adam.")]), "ok": True},
            {"chosen": messages(CHATS[2][:2]), "rejected": messages([CHATS[2][0], ("assistant", "No.")]), "ok": False}]
    assert run_chat(tmp_path, tokenizer_dir, rows, "--jsonl-keys", "chosen", "rejected", "--for-rm", "--reward-key",
                    "ok", "--binary-reward", name="rm", ) == 0
    for key in ("chosen", "rejected"):
        for row, doc, label in zip(rows, read(tmp_path / f"rm_{key}_document"),
                                   read(tmp_path / f"rm_{key}_label_document")):
            render = reference.apply_chat_template(row[key], tokenize=True, return_dict=False)
            # gpt-neox's reward-model layout: EOS twice, only the last one is a target (scored by the value head).
            assert doc == render + [EOS, EOS] and label == [-100] * (len(render) + 1) + [EOS]
        assert read(tmp_path / f"rm_{key}_reward_document") == [[1], [-1]]


@pytest.mark.parametrize("rows, flags, fragment", [
    ([{"messages": "not a list"}], [], "expected a non-empty list"),
    ([{"messages": [{"role": "user", "content": "x"}], "score": 0.5}], ["--reward-key", "score"], "integers"),
    ([{"messages": [{"role": "user", "content": "x"}]}], ["--no-mask", "--for-rm"], "contradict"),
])
def test_chat_bad_input_exits_2_naming_the_problem(tmp_path, tokenizer_dir, capsys, rows, flags, fragment):
    assert run_chat(tmp_path, tokenizer_dir, rows, "--jsonl-keys", "messages", *flags) == 2
    assert fragment in capsys.readouterr().err
    assert not list(tmp_path.glob("out_*"))  # nothing is left under the output names


def test_chat_tokenizer_without_template_is_refused(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_bytes(NEOX20B_TOKENIZER.read_bytes())
    assert run_chat(tmp_path, plain, [{"messages": messages(CHATS[1])}], "--jsonl-keys", "messages") == 2
    assert "no chat template" in capsys.readouterr().err


def test_chat_workers_write_the_same_shards(tmp_path, tokenizer_dir):
    rows = [{"messages": messages(CHATS[i % len(CHATS)])} for i in range(40)]
    for name, flags in (("one", []), ("four", ["--workers", "4", "--worker-kind", "thread"])):
        assert run_chat(tmp_path, tokenizer_dir, rows, "--jsonl-keys", "messages", *flags, name=name) == 0
    for suffix in ("messages_document", "messages_label_document"):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"one_{suffix}{ext}").read_bytes() == (tmp_path / f"four_{suffix}{ext}").read_bytes()


MASK_ARGS = ["--tokenizer-type", "HFTokenizer", "--vocab-file", str(NEOX20B_TOKENIZER), "--append-eod"]


def test_prompt_completion_pairs_mask_the_prompt(tmp_path):
    pairs = [{"prompt": "Q: In the beginning God created", "completion": " the heaven and the earth."},
             {"prompt": "Q: Say yes.\nA:", "completion": " Yes."}]
    assert mask_tool.main(["--input", str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "--prompt-key", "prompt",
                           "--completion-key", "completion", "--output-prefix", str(tmp_path / "p"), *MASK_ARGS]) == 0
    ref = tokenizers.Tokenizer.from_file(str(NEOX20B_TOKENIZER))
    for pair, doc, label in zip(pairs, read(tmp_path / "p_text_document"), read(tmp_path / "p_label_document"),
                                strict=True):
        prompt, completion = ref.encode(pair["prompt"]).ids, ref.encode(pair["completion"]).ids + [EOS]
        assert doc == prompt + completion and label == [-100] * len(prompt) + completion


def test_mask_before_token_masks_through_the_first_occurrence(tmp_path):
    ref = tokenizers.Tokenizer.from_file(str(NEOX20B_TOKENIZER))
    pivot = ref.encode(" Answer:").ids
    texts = [{"text": "Question: two plus two? Answer: four. Answer: again"}, {"text": "no pivot here"}]
    assert mask_tool.main(["--input", str(write_jsonl(tmp_path / "t.jsonl", texts)), "--mask-before-token",
                           ",".join(map(str, pivot)), "--output-prefix", str(tmp_path / "m"), *MASK_ARGS]) == 0
    first, second = (ref.encode(t["text"]).ids + [EOS] for t in texts)
    start = next(i for i in range(len(first)) if first[i:i + len(pivot)] == pivot) + len(pivot)
    assert read(tmp_path / "m_text_document") == [first, second]
    assert read(tmp_path / "m_label_document") == [[-100] * start + first[start:], second]


def test_mask_tool_needs_something_to_mask(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    assert mask_tool.main(["--input", str(path), "--output-prefix", str(tmp_path / "m"), *MASK_ARGS]) == 2
    assert "nothing to mask" in capsys.readouterr().err
    assert mask_tool.main(["--input", str(path), "--prompt-key", "text", "--output-prefix", str(tmp_path / "m"),
                           *MASK_ARGS]) == 2
    assert "both --prompt-key and --completion-key" in capsys.readouterr().err
    assert np.asarray(list(tmp_path.glob("m_*"))).size == 0
