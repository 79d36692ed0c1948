"""tools/train_tokenizer.py run as a user runs it: a subprocess on the bundled KJV corpus."""
from __future__ import annotations

import subprocess
import sys

from conftest import CORPORA, REPO_ROOT

from neox.data.sources import iter_texts
from neox.tokenizer import build_tokenizer

TOOL = REPO_ROOT / "tools" / "train_tokenizer.py"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def test_trains_a_loadable_tokenizer(tmp_path):
    corpus = CORPORA / "kjv.jsonl.zst"
    out_dir = tmp_path / "tok"
    result = run_tool("--input", str(corpus), "--vocab-size", "800", "--min-frequency", "3",
                      "--output", f"{out_dir}/")
    assert result.returncode == 0, result.stderr
    written = out_dir / "tokenizer.json"
    assert f"wrote {written}" in result.stdout and "1188 documents" in result.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["tokenizer.json"]  # no temporary left behind

    tokenizer = build_tokenizer("HFTokenizer", written)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (800, 0, 1)
    texts = [text for _, text in zip(range(40), iter_texts([corpus]))]
    texts.append("Unseen: naïve 日本語 🎉\n\n\tcode(x) <- 42  ")
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids and max(ids) < 800 and tokenizer.eod not in ids
        assert tokenizer.decode(ids) == text
    # merges learnt from the corpus compress it: well under one token per byte
    kjv_bytes = sum(len(t.encode()) for t in texts[:40])
    assert sum(len(tokenizer.encode(t)) for t in texts[:40]) < 0.5 * kjv_bytes
    assert tokenizer.encode("<|endoftext|>") == [0] and tokenizer.encode("<|padding|>") == [1]


def test_missing_input_is_exit_2_naming_the_file(tmp_path):
    missing = tmp_path / "no_such_corpus.jsonl.zst"
    output = tmp_path / "out.json"
    result = run_tool("--input", str(missing), "--vocab-size", "800", "--output", str(output))
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()


def test_too_small_vocab_is_exit_2(tmp_path):
    result = run_tool("--input", str(CORPORA / "kjv.jsonl.zst"), "--vocab-size", "100",
                      "--output", str(tmp_path / "t.json"))
    assert result.returncode == 2
    assert "--vocab-size 100" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
