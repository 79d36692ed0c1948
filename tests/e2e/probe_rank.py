"""A stand-in rank entrypoint for the launcher test: joins the gloo group, all-reduces its rank, and writes
what DeepSpeed's launcher gave it to {dir of --config}/probe/rank{RANK}.json."""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from neox.config import load_resolved


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    cfg = load_resolved(args.config)
    dist.init_process_group("gloo")
    rank_sum = torch.tensor([dist.get_rank()])
    dist.all_reduce(rank_sum)
    record = {
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMP_NUM_THREADS", "MASTER_PORT")},
        "config": args.config,
        "world_size_in_config": cfg.derived.world_size,
        "rank_sum": int(rank_sum.item()),
        "torch_threads": torch.get_num_threads(),
    }
    dist.destroy_process_group()
    out = Path(args.config).parent / "probe" / f"rank{record['env']['RANK']}.json"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
