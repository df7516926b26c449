"""``python -m spfde_edge.export``: parse options into ExportOptions and export (or inspect)."""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from device_runner.cli import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    from spfde_edge.models import BN_MOMENTUM_HELP, INIT_FROM_HELP

    p = ArgumentParser(
        prog="python -m spfde_edge.export",
        description="Export a model (trained checkpoint or fresh) as an SpFDE device bundle: per "
                    "freezing stage, the frozen prefix as ExecuTorch (.pte, XNNPACK) and ONNX "
                    "inference graphs and the sparse suffix as ONNX Runtime on-device training "
                    "artifacts, plus manifest.json. Every export checks parity against PyTorch "
                    "and refuses to write a bundle that fails. Format: docs/bundle.md.",
        epilog="examples:\n"
               "  python -m spfde_edge.export --model resnet18\n"
               "  python -m spfde_edge.export --checkpoint runs/r32-90/checkpoint.pt --out export/r32-90\n"
               "  python -m spfde_edge.export --model resnet18 --stages 4-6 --batch-size 32 "
               "--input-size 32 --num-classes 10 --out export/r18\n"
               "  python -m spfde_edge.export --model resnet18 --out export/r18 --sign-key keys/release.key\n"
               "  python -m spfde_edge.export --inspect export/r18 [--trusted-keys keys/]\n"
               "  python -m spfde_edge.export --from-device runs/dev --format pte --out model.pte",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to export (one of)")
    what.add_argument("--model", metavar="NAME",
                      help="fresh weights of a registered model, torchvision:NAME, timm:NAME or your own "
                           "package.module:factory / file.py:factory (docs/models.md); with --checkpoint, "
                           "a check that it holds this model (and leave to import your own model's code)")
    what.add_argument("--checkpoint", metavar="PATH",
                      help="checkpoint.pt written by spfde_edge.train (or its run folder)")
    what.add_argument("--from-device", metavar="RUN",
                      help="the model a device run trained (python -m device_runner --out RUN), brought "
                           "home and written whole as one XNNPACK .pte (needs --format pte)")
    what.add_argument("--inspect", metavar="BUNDLE",
                      help="print what a bundle holds (stages, files, sizes, sparsity per layer) "
                           "after re-verifying every sha256; exports nothing")
    bundle = p.add_argument_group("bundle")
    bundle.add_argument("--out", metavar="DIR", help="output folder (default export/<model>); "
                        "written in a temporary folder and renamed when complete")
    bundle.add_argument("--stages", metavar="K|A-B",
                        help="format 1 only: split points to export, stage k = blocks before k frozen "
                             "(default: from the current frozen point to the last block the freezing "
                             "schedule freezes); format 2 holds every block boundary")
    bundle.add_argument("--batch-size", type=int,
                        help="device batch: the .pte's fixed batch and the parity batch "
                             "(default: the run's batch size, 64 for a fresh model)")
    bundle.add_argument("--input-size", type=int, help="image side in pixels (default: the run's, 32 fresh)")
    bundle.add_argument("--format", choices=("bundle", "pte"), default="bundle",
                        help="bundle (default), or pte with --from-device: image (float32 pixels 0..255) "
                             "-> logits in one ExecuTorch program, written to --out (default export/RUN.pte)")
    bundle.add_argument("--force", action="store_true",
                        help="replace an existing bundle of another model in --out")
    bundle.add_argument("--bundle-format", type=int, choices=(1, 2), default=2,
                        help="2 (default): the weights once in one sparse store and each block's programs "
                             "once, freezing at any block boundary (docs/bundle.md); 1: a graph set per "
                             "stage (--stages), with an ExecuTorch .pte prefix")
    bundle.add_argument("--opset", type=int, default=17, help="ONNX opset, 14-20 (default 17)")
    bundle.add_argument("--no-step-graph", dest="step_graph", action="store_false",
                        help="format 1: skip step.onnx, the standard-ONNX training step that plain "
                             "onnxruntime runs (needed on aarch64; adds about a minute per stage)")
    bundle.add_argument("--no-ort-training", dest="ort_training", action="store_false",
                        help="format 2: leave out the ONNX Runtime training artifacts (for a model with a "
                             "layer ONNX Runtime training has no gradient for); the device trains on the "
                             "block chain, which any ONNX Runtime build runs")
    bundle.add_argument("--seed", type=int, default=0,
                        help="seed of a fresh model's weights and masks, and of the parity batches (default 0)")
    bundle.add_argument("--parity-steps", type=int,
                        help="format 1: ORT vs PyTorch training steps checked per stage (default 10); "
                             "format 2 checks every block's programs and one step per export")
    trust = p.add_argument_group("trust (docs/trust.md)")
    trust.add_argument("--sign-key", metavar="KEY",
                       help="sign the bundle's manifest.json with this Ed25519 private key (made by "
                            "python -m device_runner keygen --out keys/); writes manifest.json.sig")
    trust.add_argument("--trusted-keys", metavar="DIR",
                       help="with --inspect: check the signature against the NAME.pub keys in DIR")
    fresh = p.add_argument_group("fresh model only (a checkpoint carries its own)")
    fresh.add_argument("--num-classes", type=int, help="default 10")
    fresh.add_argument("--bn-momentum", type=float, help=BN_MOMENTUM_HELP)
    fresh.add_argument("--init-from", metavar="PATH", help=INIT_FROM_HELP)
    fresh.add_argument("--width", type=float, help="channel multiplier (default: the model's)")
    fresh.add_argument("--imagenet-stem", dest="cifar_stem", action="store_false",
                       help="ImageNet stem (resnet18: 7x7/2 conv + max-pool; a library model as published) instead of the CIFAR stem (first conv stride 1)")
    fresh.add_argument("--sparsity", type=float, help="fraction of zero weights, first conv dense (default 0.9)")
    fresh.add_argument("--distribution", choices=("uniform", "erk"), help="per-layer sparsity (default uniform, as the trainer)")
    fresh.add_argument("--freeze-flops", type=float,
                       help="training-FLOPs reduction the freezing schedule targets (default 0.3)")
    fresh.add_argument("--epochs", type=int, help="length of the schedule to continue on device (default 160)")
    fresh.add_argument("--delta-tau", type=int, help="Δτ in epochs (default 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A kill during the export unwinds like an error, so the temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # Imports after parsing: --help stays fast and the core import stays light.
    from spfde_edge.checkpoint import CheckpointError
    from spfde_edge.config import ConfigError
    from spfde_edge.freezing import FreezeError
    from spfde_edge.models import ModelError
    from spfde_edge.sparsity.masks import SparsityError

    from device_runner.errors import TrustError

    from spfde_edge.user_models import allow

    from . import BundleError, ExportOptions, ParityError, export_bundle, inspect_bundle

    allow(args.model)  # named on this command line: its code may be imported

    try:
        if args.from_device is not None or args.format == "pte":
            if args.from_device is None or args.format != "pte" or args.checkpoint or args.inspect:
                raise BundleError("--from-device RUN goes with --format pte (and --model for your own model's code) only; for a bundle, bring the run "
                                  "home first (python -m spfde_edge.import RUN --out runs/x) and export "
                                  "--checkpoint runs/x")
            from .trained import export_trained_pte
            export_trained_pte(args.from_device, args.out, args.batch_size)
            return 0
        if args.inspect is not None:
            if args.model or args.checkpoint or args.sign_key:
                raise BundleError("--inspect reads a bundle; drop --model/--checkpoint/--sign-key")
            print(inspect_bundle(Path(args.inspect), args.trusted_keys))
            return 0
        if args.trusted_keys:
            raise BundleError("--trusted-keys checks a bundle with --inspect; to sign an export give --sign-key")
        options = ExportOptions(
            model=args.model, checkpoint=args.checkpoint, out=args.out, stages=args.stages,
            batch_size=args.batch_size, input_size=args.input_size, num_classes=args.num_classes,
            width=args.width, cifar_stem=args.cifar_stem, init_from=args.init_from,
            bn_momentum=args.bn_momentum, sparsity=args.sparsity,
            distribution=args.distribution, freeze_flops=args.freeze_flops, epochs=args.epochs,
            delta_tau=args.delta_tau, seed=args.seed, force=args.force, opset=args.opset,
            parity_steps=10 if args.parity_steps is None else args.parity_steps, step_graph=args.step_graph,
            bundle_format=args.bundle_format, ort_training=args.ort_training)
        if args.bundle_format == 2 and args.parity_steps is not None:
            raise BundleError("--parity-steps applies to format 1 (its ORT steps per stage); format 2 checks "
                              "every block's programs and one ORT step on every export (drop --parity-steps)")
        export_bundle(options, sign_key=args.sign_key)
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (BundleError, CheckpointError, ConfigError, FreezeError, ModelError, SparsityError, TrustError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
