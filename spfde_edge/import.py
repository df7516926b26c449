"""``python -m spfde_edge.import RUN --out DIR``: a device run's model as a host checkpoint.

(``import`` is a Python keyword, so this module is only ever run with ``-m``; the work is in
``spfde_edge.device_import``, which tests call directly.)
"""
from __future__ import annotations

import argparse
import sys

from device_runner.cli import ArgumentParser

from spfde_edge.device_import import add_host_plan_options, run_host_command


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
    add_host_plan_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spfde_edge.device_import import import_run

    return run_host_command(lambda: import_run(args.run, args.out, epochs=args.epochs, dataset=args.dataset,
                                               data_dir=args.data_dir),
                            model=args.model)


if __name__ == "__main__":
    sys.exit(main())
