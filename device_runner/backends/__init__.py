"""Backends behind two small interfaces.

* a *prefix* maps a float32 input batch to the features of the frozen blocks
  (``forward(x) -> features``; ``name`` says which runtime ran it);
* a *suffix trainer* runs ``train_step``/``eval_step`` on the sparse suffix and exposes its
  parameters by name (``get_parameter``/``set_parameter``) and ``save``.


Suffix backends, chosen by the profile's ``suffix_backend`` (or ``--suffix-backend``):

* ``onnxruntime-training``: the stage's ORT on-device training artifacts; needs the training
  build of ONNX Runtime (``onnxruntime-training-cpu``, x86_64 wheels only);
* ``onnxruntime``: the stage's ``step.onnx``, a whole training step in standard ONNX
  operators, on any ONNX Runtime build (aarch64 included);
* ``auto``: the training build when it is installed, otherwise the step graph.

A format-2 bundle (per-block programs, one weight store) trains on ``onnxruntime`` as a
chain of block programs (block_chain.py); ``auto`` picks it, and ``onnxruntime-training``
needs the bundle's ORT training artifacts (``ort_training`` in its manifest).
"""
from __future__ import annotations

TRAINING = "onnxruntime-training"
STEP_GRAPH = "onnxruntime"


def training_build_present() -> bool:
    from ._ort import onnxruntime
    return hasattr(onnxruntime.capi._pybind_state, "load_checkpoint")


def choose_suffix_backend(wanted: str, bundle, run_ks, threads: int | None = None) -> tuple[type, str]:
    """The trainer class for ``wanted`` and a sentence saying why; BundleError if impossible.

    ``run_ks``: the stages the run moves through (format 2 is checked on those; format 1 on
    every stage it exported)."""
    from ..errors import BundleError

    if bundle.format_version == 2:
        return _choose_for_blocks(wanted, bundle, [bundle.stage(k) for k in run_ks], threads)
    stages = bundle.stages
    have_step = all(STEP_GRAPH in s.backends and s.step_model is not None for s in stages)
    have_training_build = training_build_present()
    if wanted == "auto":
        if have_training_build:
            wanted, why = TRAINING, "auto: the ONNX Runtime training build is installed"
        elif have_step:
            wanted, why = STEP_GRAPH, "auto: this ONNX Runtime has no training build"
        else:
            raise BundleError("this onnxruntime has no training support and the bundle has no "
                              "step.onnx graphs; re-export it with this spfde_edge, or install "
                              "onnxruntime-training-cpu (x86_64 only)")
    else:
        why = f"profile suffix_backend: {wanted}"
    if wanted == TRAINING:
        if not have_training_build:
            raise BundleError("suffix_backend onnxruntime-training needs onnxruntime-training-cpu "
                              "(x86_64 only); on this machine set suffix_backend: onnxruntime")
        from .ort_training import SuffixTrainer
        return SuffixTrainer, f"{TRAINING} ({why})"
    if wanted == STEP_GRAPH:
        if not have_step:
            raise BundleError("suffix_backend onnxruntime needs step.onnx in every stage; re-export "
                              "the bundle with this spfde_edge (without --no-step-graph)")
        from .onnx_step import StepGraphTrainer
        return StepGraphTrainer, f"{STEP_GRAPH} step graph ({why})"
    raise BundleError(f"unknown suffix_backend {wanted!r}; use auto, {TRAINING} or {STEP_GRAPH}")


def _choose_for_blocks(wanted: str, bundle, stages, threads: int | None) -> tuple[type, str]:
    """Format 2: the block chain, unless the ORT training build is asked for by name."""
    from ..errors import BundleError

    if wanted in ("auto", STEP_GRAPH):
        from .block_chain import BlockChainTrainer
        why = ("auto: the bundle's per-block programs run on any ONNX Runtime build" if wanted == "auto"
               else f"profile suffix_backend: {wanted}")
        return BlockChainTrainer, f"{STEP_GRAPH} block chain ({why})"
    if wanted == TRAINING:
        lacking = [s.k for s in stages if TRAINING not in s.backends]
        if lacking:
            raise BundleError(f"suffix_backend onnxruntime-training: this bundle has no ORT training "
                              f"artifacts for stage(s) {lacking} (manifest ort_training); set "
                              "suffix_backend: onnxruntime or auto, or re-export it with them")
        if not training_build_present():
            raise BundleError("suffix_backend onnxruntime-training needs onnxruntime-training-cpu "
                              "(x86_64 only); on this machine set suffix_backend: onnxruntime")
        from .ort_boundary import OrtBoundaryTrainer
        return (OrtBoundaryTrainer.factory(bundle, threads),
                f"{TRAINING} (format 2: each boundary's artifacts, checkpoint written from the weight "
                f"store; profile suffix_backend: {wanted})")
    raise BundleError(f"unknown suffix_backend {wanted!r}; use auto, {TRAINING} or {STEP_GRAPH}")
