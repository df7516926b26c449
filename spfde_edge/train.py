"""``python -m spfde_edge.train``: parse options into a TrainConfig and run the trainer."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from device_runner.cli import ArgumentParser

from .checkpoint import CheckpointError
from .config import ConfigError, TrainConfig
from .data import DataError
from .distributed import LauncherGone, shutdown
from .freezing import FreezeError
from .models import BN_MOMENTUM_HELP, INIT_FROM_HELP, MODEL_HELP, ModelError, available_models, folder_name
from .sieve import SieveError
from .sparsity.dst import ScheduleError
from .sparsity.masks import SparsityError

USER_ERRORS = (ConfigError, CheckpointError, DataError, FreezeError, ModelError, SieveError,
               ScheduleError, SparsityError, FloatingPointError, LauncherGone)

DST_CHOICES = ("mest", "rigl", "set", "static")
DATASETS = ("cifar10", "cifar100", "imagefolder", "digits", "synthetic")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = ArgumentParser(
        prog="python -m spfde_edge.train",
        description="Train with SpFDE: dynamic sparse training, progressive layer freezing and "
                    "circular data sieving. Options left out take the defaults shown.",
        argument_default=argparse.SUPPRESS)
    run = p.add_argument_group("run")
    run.add_argument("--out", help="run folder for checkpoint.pt, metrics.jsonl, summary.json "
                                   "(default runs/<model>-<dataset>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR exactly; "
                     "other options must be left out or equal the saved ones")
    run.add_argument("--stop-after", type=int, metavar="N",
                     help="stop once N epochs are done (continue later with --resume)")
    run.add_argument("--seed", type=int, help=f"seed for init, masks, data order, sieve (default {d.seed})")
    run.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    run.add_argument("--device", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default auto)")
    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="NAME",
                       help=MODEL_HELP.format(registered=", ".join(available_models()))
                       + f" (default {d.model})")
    model.add_argument("--bn-momentum", type=float, help=BN_MOMENTUM_HELP)
    model.add_argument("--init-from", metavar="PATH", help=INIT_FROM_HELP)
    model.add_argument("--width", type=float,
                       help="channel multiplier (default: 2 for resnet32 as in the paper, 1 otherwise)")
    model.add_argument("--imagenet-stem", dest="cifar_stem", action="store_false",
                       help="use the ImageNet stem (resnet18: 7x7/2 conv + max-pool; a library model as published) instead of the CIFAR stem (first conv stride 1)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, help=f"default {d.dataset}")
    data.add_argument("--data-dir", help="dataset root (cifar10/100) or class-folder root (imagefolder)")
    data.add_argument("--download", action="store_true", help="let torchvision download CIFAR (internet)")
    data.add_argument("--input-size", type=int, help=f"image side in pixels (default {d.input_size})")
    data.add_argument("--val-fraction", type=float,
                      help=f"validation split carved from the training set, fixed seed; 0 for none "
                           f"(no validation accuracy is reported) (default {d.val_fraction})")
    data.add_argument("--synthetic-size", type=int, help=f"samples of --dataset synthetic (default {d.synthetic_size})")
    data.add_argument("--train-subset", type=int,
                      help="train on a seeded, class-balanced subset of this many samples (short runs)")
    data.add_argument("--no-augment", dest="augment", action="store_false",
                      help="disable random crop (pad 4) and horizontal flip")
    data.add_argument("--cache-dir", help="where decoded imagefolder arrays are cached (default ~/.cache/spfde_edge)")
    opt = p.add_argument_group("optimisation (SGD, momentum, per-block cosine LR)")
    opt.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    opt.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    opt.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    opt.add_argument("--warmup-epochs", type=float,
                     help=f"linear LR warmup before each block's cosine (default {d.warmup_epochs:g})")
    opt.add_argument("--momentum", type=float, help=f"default {d.momentum}")
    opt.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    spfde = p.add_argument_group("SpFDE")
    spfde.add_argument("--delta-tau", type=int,
                       help=f"Δτ: epochs between mask updates, sieve updates and freezing steps (default {d.delta_tau})")
    spfde.add_argument("--sparsity", type=float, help=f"fraction of zero weights, first conv dense (default {d.sparsity})")
    spfde.add_argument("--distribution", choices=("uniform", "erk"), help=f"per-layer sparsity (default {d.distribution})")
    spfde.add_argument("--dst", choices=DST_CHOICES, help=f"prune-and-grow algorithm (default {d.dst})")
    spfde.add_argument("--update-fraction", type=float,
                       help=f"initial prune-and-grow fraction, cosine-decayed (default {d.update_fraction})")
    spfde.add_argument("--mest-lambda", type=float,
                       help=f"MEST's λ in the prune score |w| + λ|g| (default {d.mest_lambda})")
    spfde.add_argument("--freeze-flops", type=float,
                       help=f"target training-FLOPs reduction from progressive freezing (default {d.freeze_flops})")
    spfde.add_argument("--max-frozen-fraction", type=float,
                       help="most blocks that may freeze, as a fraction (default 2/3)")
    spfde.add_argument("--sieve", type=float, help=f"fraction of training data kept removed (default {d.sieve})")
    spfde.add_argument("--sieve-swap", type=float,
                       help=f"fraction of the removed queue exchanged per sieve update (default {d.sieve_swap})")
    return p


def main(argv: list[str] | None = None) -> int:
    from . import trainer as trainer_mod  # torch import after argument parsing keeps --help fast

    args = vars(build_parser().parse_args(argv))
    from .user_models import allow

    allow(args.get("model"))  # named on this command line: its code may be imported
    resume_dir = args.pop("resume", None)
    stop_after = args.pop("stop_after", None)
    out = args.pop("out", None)
    try:
        if resume_dir is not None:
            if out is not None and Path(out) != Path(resume_dir):
                raise ConfigError("--out and --resume name different folders; --resume continues in place")
            run = trainer_mod.resume(Path(resume_dir), overrides=args)
        else:
            config = TrainConfig(**args).validate()
            out = out or f"runs/{folder_name(config.model)}-{config.dataset}"
            if Path(out).exists() and not Path(out).is_dir():
                raise ConfigError(f"--out {out} is a file; the run needs a new or empty folder")
            run = trainer_mod.start(config, Path(out))
        summary = run.run(stop_after=stop_after)
        if not run.dist.is_main:
            return 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a full disk: atomic writes keep the last complete checkpoint
        print(f"error: cannot write the run ({exc.strerror or exc}); the last complete checkpoint is "
              "kept: free space, then --resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last completed epoch is in the checkpoint (use --resume)", file=sys.stderr)
        return 130
    finally:
        shutdown()
    val = "-" if summary["val_acc"] is None else f"{summary['val_acc']:.4f}"
    print(f"done: {summary['epochs_done']} epochs, val_acc {val}, "
          f"training FLOPs {summary['train_flops']:.3e} ({summary['reduction_vs_sparse']:.1%} below the "
          f"sparse reference, {summary['reduction_vs_dense']:.1%} below dense), "
          f"peak RSS {summary['peak_rss_mb']:.0f} MB -> {run.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
