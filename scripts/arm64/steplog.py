"""``python -m device_runner`` with every training step's loss logged.

The runner's metrics.jsonl has one line per epoch; the arm64 compare wants each step. This
runs the runner's own ``main`` unchanged and records, for every ``train_step`` that
``Runner.run`` makes, the stage, epoch, position, batch size, loss and train-step seconds to
``OUT/step_losses.jsonl`` (the planning steps before training are not logged), and at the
end the suffix's parameters through the trainer interface to ``OUT/final_params.npz``.

    python scripts/arm64/steplog.py --bundle B --profile P --data imagefolder:D --out OUT ...
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import numpy as np  # noqa: E402

from device_runner import loop  # noqa: E402
from device_runner.__main__ import main  # noqa: E402


def _out_dir(argv: list[str]) -> Path:
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--out="):
            return Path(arg.split("=", 1)[1])
    return Path("runs/device")


def install(log_path: Path) -> None:
    """Wrap the train_step of every trainer a Runner holds (whatever backend built it)."""
    run, set_attr = loop.Runner.run, loop.Runner.__setattr__

    def logged_run(self):
        self._steplog_on = True
        try:
            result = run(self)
        finally:
            self._steplog_on = False
        # The suffix's weights as the backend holds them, whatever its checkpoint format.
        names = list(self.trainer.parameter_names())
        np.savez(Path(self.out) / "final_params.npz", **{n: self.trainer.get_parameter(n) for n in names})
        return result

    def hooked_setattr(self, name, value):
        if name == "trainer" and value is not None and not getattr(value, "_steplogged", False):
            step = value.train_step

            def train_step(features, labels):
                started = time.perf_counter()
                loss, logits = step(features, labels)
                seconds = time.perf_counter() - started
                if getattr(self, "_steplog_on", False):
                    record = {"stage": self.stage_k, "epoch": self.epoch, "position": self.position,
                              "batch": int(len(labels)), "loss": float(loss), "train_s": seconds}
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                return loss, logits

            value.train_step = train_step
            value._steplogged = True
        set_attr(self, name, value)

    loop.Runner.run = logged_run
    loop.Runner.__setattr__ = hooked_setattr


if __name__ == "__main__":
    argv = sys.argv[1:]
    log = _out_dir(argv).resolve() / "step_losses.jsonl"  # the runner creates the folder
    if log.exists():
        os.remove(log)
    install(log)
    sys.exit(main(argv))
