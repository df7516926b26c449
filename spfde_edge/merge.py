"""``python -m spfde_edge.merge RUN_A RUN_B ... --out DIR``: several device runs of one bundle
averaged into one host checkpoint, ready to export as the next round's bundle (rules:
``spfde_edge.fleet``)."""
from __future__ import annotations

import argparse
import sys

from device_runner.cli import ArgumentParser

from spfde_edge.device_import import add_host_plan_options, run_host_command


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m spfde_edge.merge",
        description="Merge the models of several device runs of ONE bundle (e.g. one per board): "
                    "weights averaged by samples trained, each layer's sparsity kept exact (masks by "
                    "summed magnitude), BatchNorm statistics averaged, frozen at the earliest common "
                    "point. Writes a host checkpoint to resume or export. See docs/device.md.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by python -m device_runner")
    add_host_plan_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spfde_edge.fleet import merge_runs

    return run_host_command(lambda: merge_runs(args.runs, args.out, epochs=args.epochs, dataset=args.dataset,
                                               data_dir=args.data_dir),
                            model=args.model)


if __name__ == "__main__":
    sys.exit(main())
