"""The two muP runs that train nothing, as gpt-neox has them: save_base_shapes and coord_check.

Each writes its files and returns; the rank program then ends normally (gpt-neox calls sys.exit(1) instead).
Rank 0 does the work: the base shapes are those of the single-device model, and the coordinate check trains
single-device models; the other ranks have nothing to do.
"""
from __future__ import annotations

from pathlib import Path

import torch

from neox.config.neox_config import NeoXConfig
from neox.model.base_shapes import base_shapes_of, mup_setup, write_base_shapes
from neox.train import coord_check

CSV_NAME = "coord_check.csv"
PLOT_NAMES = {"mup": "coord_check_up.jpg", "sp": "coord_check_sp.jpg"}  # gpt-neox's names, without its .rank


def save_base_shapes(cfg: NeoXConfig, rank: int) -> Path | None:
    """Write base_shapes_file from this model and one mup_width_scale times wider; the path (None off rank 0)."""
    if rank != 0:
        return None
    path = write_base_shapes(cfg.mup.base_shapes_file, base_shapes_of(cfg.model, cfg.mup.mup_width_scale))
    print(f"save_base_shapes: wrote {path} (widths measured against hidden_size {cfg.model.hidden_size} x "
          f"{cfg.mup.mup_width_scale}); set save_base_shapes: false to train", flush=True)
    return path


def run_coord_check(cfg: NeoXConfig, batch: dict[str, torch.Tensor], out_dir: Path, rank: int,
                    device: torch.device) -> list[Path]:
    """muP and SP coordinate data over gpt-neox's widths on one batch: CSV and two plots in out_dir (rank 0)."""
    if rank != 0:
        return []
    widths = coord_check.coord_check_widths(cfg.model)
    records = []
    for mup in (mup_setup(cfg.mup), None):
        records += coord_check.coord_data(cfg.model, mup, widths, batch, cfg.optim.optimizer, cfg.optim.weight_decay,
                                          seed=cfg.train.seed, device=device)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [coord_check.write_csv(out_dir / CSV_NAME, records)]
    for name, file_name in PLOT_NAMES.items():
        title = f"coordinate check, {'muP' if name == 'mup' else 'standard parametrisation'}"
        written.append(coord_check.plot(out_dir / file_name, [r for r in records if r["parametrization"] == name],
                                        title))
    print(f"coord_check: widths {widths}; wrote {', '.join(str(p) for p in written)}; set coord_check: false to "
          "train", flush=True)
    return written
