"""Bad inputs across the CLI, typed as a user types them: each gives one paragraph naming the file, line or key to
fix and what to do, exit code 2, never a traceback.

Most cases fail in deepy (or the tool) before any rank starts; each of those also shows the check lets the good
input through, so a check that refused everything would fail here. The few cases that need ranks are slow.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from launcher import preflight
from neox.checkpoint.consolidated import save_consolidated
from neox.checkpoint.engine_state import COMPLETE_MARKER, LATEST_FILE
from neox.config import ConfigError, load_config, save_resolved
from neox.model import GPTNeoX
from tests.conftest import GPT2_MERGES, GPT2_VOCAB, REPO_ROOT
from tests.e2e.train_helpers import free_port
from tests.malicious_pickle import plant

DEEPY = REPO_ROOT / "launcher" / "deepy.py"
CPU_CONFIG = REPO_ROOT / "configs" / "cpu.yml"
PREPROCESS = REPO_ROOT / "tools" / "preprocess_data.py"
HF_TO_NEOX = REPO_ROOT / "tools" / "convert_hf_to_neox.py"
NEOX_TO_HF = REPO_ROOT / "tools" / "convert_neox_to_hf.py"
TIMEOUT_S = 150

MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
         "max_position_embeddings": 64, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
         "train_iters": 2, "eval_interval": 2, "eval_iters": 1, "split": "80,10,10",
         "tokenizer_type": "CharLevelTokenizer", "precision": "fp32", "peak_flops": 1.0e11}


# --- helpers ---------------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}


def run(*argv: str | Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=_env())


def deepy(*args: str | Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return run(DEEPY, *args, cwd=cwd)


def assert_one_paragraph(result: subprocess.CompletedProcess, *words: str, prefix: str = "deepy: error: ") -> str:
    """Exit 2, no traceback anywhere, one error paragraph on stderr holding every word; returns that paragraph."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, result.stderr[-4000:]
    for word in words:
        assert word in errors[0], f"{word!r} not in: {errors[0]}"
    return errors[0]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def preprocess(source: Path, prefix: Path, *tokenizer: str) -> Path:
    result = run(PREPROCESS, "--input", source, "--output-prefix", prefix, *tokenizer, "--append-eod")
    assert result.returncode == 0, result.stderr
    return Path(f"{prefix}_text_document")


def resolved(config: Path, *overrides: str, vocab_size: int = 512):
    return load_config([config, CPU_CONFIG], list(overrides), vocab_size=vocab_size, local_gpus=0)


def _with(config: Path, path: Path, **values) -> Path:
    """A copy of config at path with some values changed."""
    return write_yaml(path, {**yaml.safe_load(config.read_text()), **values})


def write_train_checkpoint(save_dir: Path, config: Path, iteration: int = 2) -> Path:
    """The on-disk layout neox.train writes ({save}/global_stepN with its config.yml, the model states .pt, the
    completion marker, `latest`), holding a real model's state dict; returns the global_stepN directory."""
    cfg = resolved(config, "--num_gpus", "1", "--zero_optimization.stage", "0")
    tag_dir = save_dir / f"global_step{iteration}"
    save_resolved(cfg, tag_dir / "config.yml")
    torch.save({"module": GPTNeoX(cfg.model).state_dict()}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir / "rng").mkdir()
    torch.save({"torch": torch.get_rng_state()}, tag_dir / "rng" / "rank0.pt")
    (tag_dir / COMPLETE_MARKER).write_text(json.dumps({"iteration": iteration}) + "\n")
    (save_dir / LATEST_FILE).write_text(tag_dir.name + "\n")
    return tag_dir


# --- shared inputs ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_inputs")


@pytest.fixture(scope="module")
def corpus(work) -> Path:
    path = work / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"In the beginning, document {i}. " * 12}) + "\n" for i in range(40)))
    return path


@pytest.fixture(scope="module")
def char_data(work, corpus) -> Path:
    return preprocess(corpus, work / "char", "--tokenizer-type", "CharLevelTokenizer")


@pytest.fixture(scope="module")
def gpt2_data(work, corpus) -> Path:
    return preprocess(corpus, work / "gpt2", "--tokenizer-type", "HFGPT2Tokenizer", "--vocab-file", str(GPT2_VOCAB),
                      "--merge-file", str(GPT2_MERGES))


@pytest.fixture(scope="module")
def config(work, char_data) -> Path:
    """A valid tiny char-level training config (run outputs under work/run)."""
    return write_yaml(work / "tiny.yml", {**MODEL, "data_path": str(char_data), "save": str(work / "run" / "ckpt"),
                                          "log_dir": str(work / "run" / "logs")})


@pytest.fixture(scope="module")
def checkpoint(work, config) -> Path:
    """A training save directory with one complete checkpoint of the tiny model."""
    write_train_checkpoint(work / "ckpt", config)
    return work / "ckpt"


def train_argv(config: Path, *extra: str) -> list[str | Path]:
    return ["train", config, CPU_CONFIG, "--master_port", str(free_port()), *extra]


# --- config files and values -----------------------------------------------------------------------------------

def test_broken_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yml"
    bad.write_text("num_layers: 2\nhidden_size: [64\nseq_length: 64\n")
    assert_one_paragraph(deepy("train", bad), f"{bad}:3:", "invalid YAML", "opened at line 2", "fix the syntax")


def test_yaml_list_instead_of_mapping(tmp_path):
    bad = tmp_path / "list.yml"
    bad.write_text("- num_layers: 2\n- hidden_size: 64\n")
    assert_one_paragraph(deepy("show-config", bad), str(bad), "must be a mapping of keys to values", "got list")


def test_wrong_value_type_names_key_file_and_line(config, tmp_path):
    bad = write_yaml(tmp_path / "types.yml", {"hidden_size": 64, "num_layers": "two"})
    assert_one_paragraph(deepy("train", config, bad),
                         "'num_layers'", f"{bad}:2", "int", "'two'")


def test_wrong_value_in_nested_section(config, tmp_path):
    bad = tmp_path / "zero.yml"
    bad.write_text("zero_optimization:\n  stage: three\n")
    assert_one_paragraph(deepy("show-config", config, bad), "'zero_optimization.stage'", "0, 1, 2 or 3",
                         f"{bad}:2")


def test_key_set_twice_in_one_file(tmp_path):
    bad = tmp_path / "twice.yml"
    bad.write_text("num_layers: 2\nnum-layers: 3\n")
    assert_one_paragraph(deepy("show-config", bad), f"{bad}:2", "set twice", "line 1", "keep one")


def test_unknown_key_suggests_the_close_one(config, tmp_path):
    bad = write_yaml(tmp_path / "typo.yml", {"hiden_size": 64})
    assert_one_paragraph(deepy("show-config", config, bad), f"{bad}:1", "unknown config key 'hiden_size'",
                         "did you mean 'hidden_size'")


def test_override_without_value(config):
    assert_one_paragraph(deepy("train", config, "--num_layers"), "'--num_layers' needs a value")


def test_heads_not_dividing_hidden(config):
    assert_one_paragraph(deepy(*train_argv(config, "--num_attention_heads", "5")),
                         "'num_attention_heads' (5) must divide 'hidden_size' (64)", "num_attention_heads = command line",
                         f"hidden_size = {config}:2")


def test_zero3_with_pipeline_parallel(config):
    assert_one_paragraph(deepy(*train_argv(config, "--zero_optimization.stage", "3", "--pipe_parallel_size", "2")),
                         "'zero_optimization.stage' 3 cannot be used with 'pipe_parallel_size' 2",
                         "zero_optimization.stage 1", "pipe_parallel_size 0")


def test_missing_config_file(tmp_path):
    assert_one_paragraph(deepy("train", "-d", str(tmp_path), "nothere.yml"), "config file", "nothere.yml", "not found")


# --- data and tokenizer ----------------------------------------------------------------------------------------

def test_missing_data_files(config, tmp_path):
    prefix = tmp_path / "absent_text_document"
    message = assert_one_paragraph(deepy(*train_argv(config, "--data_path", str(prefix))),
                                   "'data_path'", str(prefix), ".bin", ".idx", "without the extension",
                                   "data_path = command line")
    assert "resolved config written" not in message  # nothing was launched


def test_data_tokenized_with_another_tokenizer(config, gpt2_data, char_data, tmp_path):
    assert_one_paragraph(deepy(*train_argv(config, "--data_path", str(gpt2_data))),
                         f"{gpt2_data}.bin holds token id 50256", "CharLevelTokenizer: ids 0..511",
                         "tokenized with another tokenizer", "'tokenizer_type'", "data_path = command line")
    # The matching pair passes the same check, and GPT-2 data with the GPT-2 tokenizer too.
    preflight.check_data(resolved(_with(config, tmp_path / "char.yml", data_path=str(char_data))), vocab_size=512)
    preflight.check_data(resolved(_with(config, tmp_path / "gpt2.yml", data_path=str(gpt2_data))), vocab_size=50257)


def test_rank_program_checks_the_data_too(config, gpt2_data, tmp_path):
    """`python -m neox.train` started without deepy (1 rank) finds the foreign token ids when it opens the data."""
    cfg = resolved(_with(config, tmp_path / "gpt2.yml", data_path=str(gpt2_data)), "--num_gpus", "1",
                   "--zero_optimization.stage", "0", "--save", str(tmp_path / "run"))
    path = save_resolved(cfg, tmp_path / "resolved.yml")
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "neox.train", "--config", str(path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert_one_paragraph(result, "'data_path'", f"{gpt2_data}.bin holds token id 50256", "CharLevelTokenizer",
                         prefix="neox.train: error (rank 0): ")


def test_token_check_samples_a_large_file(tmp_path):
    """Foreign ids spread through a 2M-token file are found by the sampled windows; a clean file passes."""
    from neox.data.errors import DataError
    from neox.data.indexed import IndexedDatasetWriter
    from neox.data.token_range import WINDOW_TOKENS, SAMPLE_WINDOWS, check_token_ids

    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 500, size=2000, dtype=np.int64) for _ in range(1000)]
    assert sum(map(len, documents)) > 4 * SAMPLE_WINDOWS * WINDOW_TOKENS  # really a sample, not the whole file
    with IndexedDatasetWriter(tmp_path / "clean", np.uint16) as writer:
        for doc in documents:
            writer.add_document(doc)
    check_token_ids(tmp_path / "clean", 512, key="data_path", tokenizer="CharLevelTokenizer")
    with IndexedDatasetWriter(tmp_path / "foreign", np.uint16) as writer:
        for doc in documents:
            writer.add_document(np.where(rng.random(len(doc)) < 0.01, 30000, doc))  # 1 % of ids are large
    with pytest.raises(DataError, match=r"foreign.bin holds token id 30000.*CharLevelTokenizer: ids 0..511"):
        check_token_ids(tmp_path / "foreign", 512, key="data_path", tokenizer="CharLevelTokenizer")


def test_missing_vocab_file(config, tmp_path):
    absent = tmp_path / "tokenizer.json"
    assert_one_paragraph(deepy(*train_argv(config, "--tokenizer_type", "HFTokenizer", "--vocab_file", str(absent))),
                         "cannot build the tokenizer", str(absent), "does not exist", "vocab_file = command line")


def test_missing_merge_file(config, tmp_path):
    absent = tmp_path / "merges.txt"
    assert_one_paragraph(deepy(*train_argv(config, "--tokenizer_type", "HFGPT2Tokenizer", "--vocab_file",
                                           str(GPT2_VOCAB), "--merge_file", str(absent))),
                         "merge_file", str(absent), "does not exist", "merges.txt")


# --- checkpoints -----------------------------------------------------------------------------------------------

def test_checkpoint_of_another_architecture_names_the_keys(config, checkpoint, tmp_path):
    message = assert_one_paragraph(deepy(*train_argv(config, "--load", str(checkpoint), "--hidden_size", "128",
                                                     "--num_layers", "3")),
                                   "'load'", str(checkpoint / "global_step2"), "different architecture",
                                   "hidden_size: checkpoint 64 vs config 128", "num_layers: checkpoint 2 vs config 3")
    assert "num_attention_heads" not in message  # only the keys that differ
    preflight.check_resume_checkpoint(resolved(_with(config, tmp_path / "same.yml", load=str(checkpoint))))


def test_truncated_checkpoint_file(config, checkpoint, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    older = write_train_checkpoint(damaged, config, iteration=1)
    (damaged / LATEST_FILE).write_text("global_step2\n")
    states = damaged / "global_step2" / "mp_rank_00_model_states.pt"
    os.truncate(states, states.stat().st_size // 2)
    assert_one_paragraph(deepy(*train_argv(config, "--load", str(damaged))), str(states), "damaged",
                         "truncated or corrupt", f"an older checkpoint ({older.name})", str(damaged / LATEST_FILE))
    assert preflight.unreadable_torch_files(checkpoint / "global_step2") == []  # the intact copy passes


def test_checkpoint_holding_a_pickle_that_runs_code_is_refused_before_launch(config, checkpoint, tmp_path):
    crafted = tmp_path / "crafted"
    shutil.copytree(checkpoint, crafted)
    states = plant(crafted / "global_step2" / "mp_rank_00_model_states.pt", tmp_path / "pwned")
    assert_one_paragraph(deepy(*train_argv(config, "--load", str(crafted))), "'load'", f"refusing to load {states}",
                         "posix.system", "could run code")
    assert not (tmp_path / "pwned").exists()


def test_load_naming_a_file_is_refused_before_launch_and_by_the_rank(config, checkpoint, tmp_path):
    """deepy refuses it; a rank program started by other means (srun, mpirun, by hand) refuses it too, instead of
    training from scratch and exiting 0."""
    file = checkpoint / "global_step2" / "mp_rank_00_model_states.pt"
    cfg = resolved(_with(config, tmp_path / "file.yml", load=str(file), save=str(tmp_path / "ckpt")),
                   "--num_gpus", "1")
    with pytest.raises(ConfigError, match=re.escape(f"'load': {file} is a file, not a checkpoint folder")):
        preflight.check_resume_checkpoint(cfg)
    path = save_resolved(cfg, tmp_path / "resolved.yml")
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", "neox.train", "--config", str(path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert_one_paragraph(result, "'load'", str(file), "is a file, not a checkpoint folder",
                         prefix="neox.train: error (rank 0): ")
    assert not (tmp_path / "ckpt").exists()


def test_load_folder_that_is_no_checkpoint_is_refused_but_a_first_run_starts(config, char_data, tmp_path):
    def check(load: Path, save: Path) -> None:
        preflight.check_resume_checkpoint(resolved(_with(config, tmp_path / "run.yml", load=str(load),
                                                         save=str(save))))

    data_dir = char_data.parent
    with pytest.raises(ConfigError, match=re.escape(f"'load': {data_dir} is not a checkpoint folder: it holds no "
                                                    "global_stepN/complete.json") + ".*char_text_document.bin"):
        check(data_dir, tmp_path / "ckpt")
    check(tmp_path / "ckpt", tmp_path / "ckpt")  # gpt-neox's first run: save == load, not created yet
    (tmp_path / "ckpt").mkdir()
    check(tmp_path / "ckpt", tmp_path / "elsewhere")  # empty
    (tmp_path / "ckpt" / "resolved_config.yml").write_text("# a fresh run's, written by deepy before its ranks\n")
    check(tmp_path / "ckpt", tmp_path / "ckpt")
    with pytest.raises(ConfigError, match=r"is not a checkpoint folder.*resolved_config.yml"):
        check(tmp_path / "ckpt", tmp_path / "elsewhere")  # resuming another run that never saved


def test_eval_of_a_missing_checkpoint(config, tmp_path):
    absent = tmp_path / "no-such-ckpt"
    assert_one_paragraph(deepy("eval", config, "--load", str(absent), "--eval_tasks", "piqa",
                               "--master_port", str(free_port())),
                         "'load'", str(absent), "does not exist", "training save directory")


def test_eval_tasks_path_that_is_not_a_folder(config, checkpoint, tmp_path):
    absent = tmp_path / "my-tasks"
    assert_one_paragraph(deepy("eval", config, "--load", str(checkpoint), "--eval_tasks", "piqa",
                               "--eval_tasks_path", str(absent), "--master_port", str(free_port())),
                         "'eval_tasks_path'", str(absent), "not a directory of lm_eval task YAMLs")


# --- launch: hostfile and port ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "words"), [
    (None, ["'hostfile'", "does not exist", "'num_nodes' asks for 2"]),
    ("localhost slots=2\nnode-b\n", [":2:", "hostfile lines are 'HOST slots=N'", "'node-b'"]),
    ("localhost slots=2\nnode-b slots=two\n", [":2:", "'HOST slots=N'", "slots=two"]),
    ("# no host yet\n", ["lists no host"]),
])
def test_unreadable_hostfile(config, tmp_path, content, words):
    hostfile = tmp_path / "hostfile"
    if content is not None:
        hostfile.write_text(content)
    # A missing hostfile alone means this machine (as DeepSpeed has it); with num_nodes > 1 it is an error.
    nodes = ["--num_nodes", "2"] if content is None else []
    message = assert_one_paragraph(deepy(*train_argv(config, "--num_gpus", "null", "--hostfile", str(hostfile),
                                                     *nodes)), *words)
    assert str(hostfile) in message


def test_include_names_a_host_not_in_the_hostfile(config, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    assert_one_paragraph(deepy(*train_argv(config, "--num_gpus", "null", "--hostfile", str(hostfile),
                                           "--include", "node-z")),
                         "'include' names host 'node-z'", "not among localhost", "include = command line")


def test_master_port_in_use_is_refused_before_launching(config):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = deepy("train", config, CPU_CONFIG, "--master_port", str(port))
        assert preflight.port_is_taken(port)
    assert_one_paragraph(result, f"'master_port' {port} is already in use", "--master_port",
                         "master_port = command line")
    assert "resolved config written" not in result.stdout
    assert not preflight.port_is_taken(port)  # released: the check passes again


# --- generate --------------------------------------------------------------------------------------------------

def test_generate_with_a_missing_prompts_file(config, checkpoint, tmp_path):
    absent = tmp_path / "prompts.txt"
    assert_one_paragraph(deepy("generate", config, "--load", str(checkpoint), "-i", str(absent),
                               "-o", str(tmp_path / "out.jsonl"), "--master_port", str(free_port())),
                         "'sample_input_file' (-i)", str(absent), "does not exist")
    assert not (tmp_path / "out.jsonl").exists()


def test_generate_with_an_empty_prompts_file(config, checkpoint, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n")
    assert_one_paragraph(deepy("generate", config, "--load", str(checkpoint), "-i", str(empty),
                               "--master_port", str(free_port())),
                         "'sample_input_file' (-i)", str(empty), "holds no prompt")


# --- tools -----------------------------------------------------------------------------------------------------

def test_preprocess_with_a_missing_input(tmp_path):
    absent = tmp_path / "corpus.jsonl"
    assert_one_paragraph(run(PREPROCESS, "--input", absent, "--output-prefix", tmp_path / "out",
                             "--tokenizer-type", "CharLevelTokenizer"),
                         str(absent), "does not exist", prefix="error: ")
    assert list(tmp_path.iterdir()) == []


def test_preprocess_with_a_bad_jsonl_line(tmp_path):
    source = tmp_path / "corpus.jsonl"
    source.write_text('{"text": "fine"}\n{"text": broken\n')
    assert_one_paragraph(run(PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out",
                             "--tokenizer-type", "CharLevelTokenizer"),
                         f"{source}:2", "malformed JSON line", "--skip-bad-lines", prefix="error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_convert_hf_to_neox_of_a_folder_that_is_not_a_hf_model(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("not a model\n")
    assert_one_paragraph(run(HF_TO_NEOX, "--hf", folder, "--output", tmp_path / "out", "--quiet"),
                         str(folder), "is not a Hugging Face model directory", "no config.json",
                         prefix="convert_hf_to_neox: error: ")
    assert not (tmp_path / "out").exists()


def test_convert_neox_to_hf_of_a_folder_without_checkpoint(tmp_path):
    folder = tmp_path / "empty-run"
    folder.mkdir()
    assert_one_paragraph(run(NEOX_TO_HF, "--checkpoint", folder, "--output", tmp_path / "out", "--quiet"),
                         str(folder), "holds no complete checkpoint", "training save directory",
                         prefix="convert_neox_to_hf: error: ")


# --- per-rank programs started by hand -------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["neox.train", "neox.eval", "neox.generate"])
def test_rank_program_started_with_the_wrong_rank_count(config, checkpoint, tmp_path, module):
    """`python -m neox.X` alone (1 rank) on a config resolved for 2 ranks: the shared entrypoint refuses it."""
    cfg = resolved(_with(config, tmp_path / "two-ranks.yml", load=str(checkpoint)))
    assert cfg.derived.world_size == 2
    path = save_resolved(cfg, tmp_path / "resolved.yml")
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-m", module, "--config", str(path)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    command = module.replace("neox.", "deepy ")
    assert_one_paragraph(result, "1 ranks were started", str(path), "world_size 2", f"`{command}`",
                         prefix=f"{module}: error (rank 0): ")


# --- failures inside the ranks (slow: ranks are launched) ------------------------------------------------------

@pytest.mark.slow
def test_data_error_on_rank_0_stops_both_ranks_without_traceback(config, char_data):
    """The split leaves the test split empty: only rank 0 sees it (it builds the index first); rank 1 must not die
    in a broken barrier with a traceback."""
    result = deepy(*train_argv(config, "--split", "100,0,0"))
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    rank0 = [ln for ln in result.stderr.splitlines() if ln.startswith("neox.train: error (rank 0): ")]
    rank1 = [ln for ln in result.stderr.splitlines() if ln.startswith("neox.train: error (rank 1): ")]
    assert len(rank0) == 1 and "leaves the valid split" in rank0[0] and str(char_data) in rank0[0], output[-4000:]
    assert len(rank1) == 1 and "the rank building the dataset index caches" in rank1[0], output[-4000:]


@pytest.mark.slow
def test_eval_with_an_unknown_task_lists_what_was_found(work, config):
    cfg = resolved(config)
    torch.manual_seed(0)
    model_dir = save_consolidated(work / "consolidated", cfg, GPTNeoX(cfg.model).state_dict(), [], iteration=2)
    result = deepy("eval", config, CPU_CONFIG, "--num_gpus", "1", "--load", str(model_dir), "--log_dir",
                   str(work / "eval"), "--eval_tasks", "piqa", "not_a_task", "--master_port", str(free_port()))
    assert_one_paragraph(result, "'not_a_task'", "arc_easy, piqa", "--eval_tasks_path",
                         prefix="neox.eval: error (rank 0): ")
