"""kill -9 while a checkpoint is being written, six times: what `latest` / resolve_load_tag picks must always load.

One rank, started the way the launcher starts it (`python -u -m neox.train --config RESOLVED`), saving every step.
Each kill lands a random delay after the rank printed "saving checkpoint", stratified over 0 to 1.2 x the measured
save time (the i-th kill in the i-th sixth of that window, at a random point of it), so
kills fall inside DeepSpeed's files, the RNG/layout-free files, the config copy, the marker, `latest` and the
removal of old checkpoints (keep_last_n_checkpoints 2). The next launch resumes from what is left; it must load it
and say at which iteration, and that iteration must be the newest checkpoint whose save had finished.
"""
from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from neox.checkpoint.engine_state import complete_tags, resolve_load_tag
from neox.config import load_config, save_resolved
from tests.conftest import REPO_ROOT
from tests.e2e.train_helpers import CPU_LAUNCH_CONFIG, preprocess_kjv, write_config

pytestmark = pytest.mark.slow

KILLS = 6
CHAR_VOCAB = 512
_SAVING = re.compile(r"^saving checkpoint global_step(\d+)$")
_SAVED = re.compile(r"^saved checkpoint .*global_step(\d+)$")
_RESUMING = re.compile(r"resuming at iteration (\d+)")


class RankProcess:
    """One `python -m neox.train` process whose output lines are read as they come, with their arrival time."""

    def __init__(self, config: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "neox.train", "--config", str(config)],
                                     cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.perf_counter(), line.rstrip("\n")))
        self.lines.put((time.perf_counter(), ""))

    def wait_for(self, pattern: re.Pattern, timeout: float = 120.0) -> tuple[float, re.Match]:
        deadline = time.perf_counter() + timeout
        while True:
            try:
                when, line = self.lines.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout} s; output:\n"
                                     + "\n".join(self.seen[-40:])) from None
            if line == "" and self.proc.poll() is not None:
                raise AssertionError(f"the rank exited ({self.proc.returncode}) before {pattern.pattern!r}:\n"
                                     + "\n".join(self.seen[-40:]))
            self.seen.append(line)
            match = pattern.search(line)
            if match:
                return when, match

    def kill(self) -> list[str]:
        """SIGKILL, then every line the rank had written (read to the end of the pipe)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        while True:
            _, line = self.lines.get(timeout=30)
            if line == "":
                return self.seen
            self.seen.append(line)


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ckpt_kill")
    model = write_config(work / "tiny.yml", preprocess_kjv(work / "data"))
    save = work / "ckpt"
    overrides = ["--num_gpus", "1", "--zero_optimization.stage", "0", "--train_iters", "100000",
                 "--save", str(save), "--load", str(save), "--log_dir", str(work / "logs"),
                 "--save_interval", "1", "--keep_last_n_checkpoints", "2", "--eval_interval", "100000"]
    cfg = load_config([model, CPU_LAUNCH_CONFIG], overrides, vocab_size=CHAR_VOCAB)
    return save_resolved(cfg, save / "resolved_config.yml")


def test_kill_9_during_checkpointing_never_leaves_an_unloadable_latest(resolved):
    save_dir = resolved.parent
    rng = random.Random(8)
    save_seconds: list[float] = []
    hits = 0
    resumed_from: list[int] = []
    for kill in range(KILLS + 1):
        expected = resolve_load_tag(save_dir)
        rank = RankProcess(resolved)
        if expected is not None:
            # The previous kill's leftovers load: the run says where it resumes, and it is the picked tag.
            _, match = rank.wait_for(_RESUMING)
            assert f"global_step{match.group(1)}" == expected
            resumed_from.append(int(match.group(1)))
        if kill == KILLS:
            rank.kill()
            break
        # Two whole saves first (their duration sets the delays), then the kill inside the third.
        for _ in range(2):
            began, saving = rank.wait_for(_SAVING)
            ended, saved = rank.wait_for(_SAVED)
            assert saved.group(1) == saving.group(1)
            save_seconds.append(ended - began)
        _, saving = rank.wait_for(_SAVING)
        window = 1.2 * sorted(save_seconds)[len(save_seconds) // 2]
        time.sleep(window * (kill + rng.random()) / KILLS)
        lines = rank.kill()
        began_saving = max(int(m.group(1)) for line in lines if (m := _SAVING.match(line)))
        finished_saving = max(int(m.group(1)) for line in lines if (m := _SAVED.match(line)))
        hits += began_saving > finished_saving
        picked = resolve_load_tag(save_dir)
        # Never older than the last save that finished; newer only if the cut one got as far as `latest`.
        assert picked is not None and int(picked.removeprefix("global_step")) in (finished_saving, began_saving), (
            picked, finished_saving, began_saving, sorted(p.name for p in save_dir.iterdir()))
        assert picked in complete_tags(save_dir)
    median_save = sorted(save_seconds)[len(save_seconds) // 2]
    print(f"{hits} of {KILLS} kills landed inside a save (median save {median_save:.3f} s); resumed from iterations "
          f"{resumed_from}")
    assert len(resumed_from) == KILLS
    # Most kills must really have cut a save short, or the test proved little.
    assert hits >= KILLS // 2
