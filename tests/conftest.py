"""Shared paths and fixtures for every test tier."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_DATA = REPO_ROOT / "data"
GPT2_VOCAB = PROJECT_DATA / "tokenizers" / "gpt2" / "vocab.json"
GPT2_MERGES = PROJECT_DATA / "tokenizers" / "gpt2" / "merges.txt"
NEOX20B_TOKENIZER = PROJECT_DATA / "tokenizers" / "neox-20b" / "tokenizer.json"
CORPORA = PROJECT_DATA / "corpora"
# ../shared/data sits beside the clone on developer machines and in CI; NEOX_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("NEOX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
BENCH_CORPUS = SHARED_DATA / "bench" / "mixed-50mb.jsonl.zst"


@pytest.fixture(scope="session")
def bench_corpus() -> Path:
    if not BENCH_CORPUS.exists():
        pytest.skip(f"benchmark corpus not found at {BENCH_CORPUS} (set NEOX_SHARED_DATA)")
    return BENCH_CORPUS
