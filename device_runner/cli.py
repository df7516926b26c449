"""What the three CLIs share: a parser whose mistakes read like every other error.

``python -m spfde_edge.train``, ``spfde_edge.export`` and ``device_runner`` all print one
``error: …`` line and exit 2 for anything the user can fix, argparse's own complaints
(``--epochs abc``) included. Torch-free, so the host imports it from here.
"""
from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse without the usage dump: one ``error:`` line that points at ``--help``."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def int_list(text: str) -> tuple[int, ...]:
    """``"3,6"`` -> ``(3, 6)`` (argparse type for comma-separated epochs)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas (e.g. 3,6), got '{text}'") from None
