"""``python -m spfde_edge.import RUN --out DIR``: a device run's model as a host checkpoint.

(``import`` is a Python keyword, so this module is only ever run with ``-m``; the work is in
``spfde_edge.device_import``, which tests call directly.)
"""
from __future__ import annotations

import argparse
import sys

from device_runner.cli import ArgumentParser

from spfde_edge.train import DATASETS


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m spfde_edge.import",
        description="Bring a device run home: its last checkpoint (device-trained weights, masks, "
                    "BatchNorm statistics, the blocks it froze) becomes a host checkpoint that "
                    "python -m spfde_edge.train --resume continues, python -m spfde_edge.export "
                    "--checkpoint exports again, and the host can evaluate. The host model's logits "
                    "are checked against the device's (1e-4) before anything is written. "
                    "See docs/device.md, 'Bring it home and several devices'.")
    p.add_argument("run", help="run folder written by python -m device_runner --out RUN")
    p.add_argument("--out", required=True, help="new run folder for checkpoint.pt and import.json")
    p.add_argument("--epochs", type=int, help="length of the SpFDE plan the host continues (default: the "
                                              "bundle's; the host resumes where the device left it)")
    p.add_argument("--dataset", choices=DATASETS, help="host data for --resume (default: the data the bundle's "
                                                       "model was trained on, its train_config)")
    p.add_argument("--data-dir", help="dataset root or class-folder root for --dataset")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spfde_edge.config import ConfigError
    from spfde_edge.data import DataError
    from spfde_edge.device_import import import_run
    from spfde_edge.freezing import FreezeError
    from spfde_edge.sparsity.masks import SparsityError
    from spfde_edge.checkpoint import CheckpointError

    try:
        import_run(args.run, args.out, epochs=args.epochs, dataset=args.dataset, data_dir=args.data_dir)
    except (CheckpointError, ConfigError, DataError, FreezeError, SparsityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
