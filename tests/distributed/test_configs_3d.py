"""The shipped 3D-layout configs resolve to the layouts their comments promise."""
from __future__ import annotations

from neox.config.load import load_config
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"


def test_cpu_3d_is_tp2_pp2_on_four_cpu_ranks():
    cfg = load_config(["tiny.yml", "cpu-3d.yml", "local_setup.yml"], config_dir=CONFIGS, vocab_size=4096,
                      local_gpus=0)
    assert (cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size) == (2, 2)
    assert (cfg.derived.world_size, cfg.derived.data_parallel_size, cfg.train.train_batch_size) == (4, 1, 8)
    assert cfg.launch.distributed_backend == "gloo" and cfg.optim.zero_stage == 1


def test_13b_3d_overlay_on_8_nodes(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("".join(f"node-{i} slots=8\n" for i in range(8)))
    cfg = load_config(["13B.yml", "3d-13B-64gpu.yml", "local_setup.yml"], [f"--hostfile={hosts}"],
                      config_dir=CONFIGS, vocab_size=50257, local_gpus=0)
    assert (cfg.parallel.model_parallel_size, cfg.parallel.pipe_parallel_size) == (2, 4)
    assert (cfg.derived.world_size, cfg.derived.data_parallel_size) == (64, 8)
    assert cfg.train.train_batch_size == 4 * 16 * 8 and cfg.optim.zero_stage == 1
    assert cfg.model.padded_vocab_size % (128 * 2) == 0 and cfg.model.checkpoint_activations
