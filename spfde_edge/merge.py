"""``python -m spfde_edge.merge RUN_A RUN_B ... --out DIR``: several device runs of one bundle
averaged into one host checkpoint, ready to export as the next round's bundle (rules:
``spfde_edge.fleet``)."""
from __future__ import annotations

import argparse
import sys

from device_runner.cli import ArgumentParser

from .train import DATASETS


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m spfde_edge.merge",
        description="Merge the models of several device runs of ONE bundle (e.g. one per board): "
                    "weights averaged by samples trained, each layer's sparsity kept exact (masks by "
                    "summed magnitude), BatchNorm statistics averaged, frozen at the earliest common "
                    "point. Writes a host checkpoint to resume or export. See docs/device.md.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by python -m device_runner")
    p.add_argument("--out", required=True, help="new run folder for checkpoint.pt and import.json")
    p.add_argument("--epochs", type=int, help="length of the SpFDE plan the host continues (default: the bundle's)")
    p.add_argument("--dataset", choices=DATASETS, help="host data for --resume (default: the bundle's train_config)")
    p.add_argument("--data-dir", help="dataset root or class-folder root for --dataset")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spfde_edge.checkpoint import CheckpointError
    from spfde_edge.config import ConfigError
    from spfde_edge.data import DataError
    from spfde_edge.fleet import merge_runs
    from spfde_edge.freezing import FreezeError
    from spfde_edge.sparsity.masks import SparsityError

    try:
        merge_runs(args.runs, args.out, epochs=args.epochs, dataset=args.dataset, data_dir=args.data_dir)
    except (CheckpointError, ConfigError, DataError, FreezeError, SparsityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
