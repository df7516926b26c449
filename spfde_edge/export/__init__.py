"""``python -m spfde_edge.export``: a deployable SpFDE bundle, one stage per freezing point.

Stage k = blocks [0, k) frozen: the prefix as inference graphs (ExecuTorch .pte with XNNPACK,
ONNX), the suffix as ONNX Runtime on-device training artifacts with masks in the graph, and
a manifest.json (types and schema: device_runner/manifest.py, format: docs/bundle.md).
The pipeline reads top to bottom: source.py -> pipeline.py (prefix.py, suffix.py,
step_graph.py, parity.py) -> manifest.py; inspect.py reads a bundle back. Heavy
dependencies (onnx, onnxruntime, executorch) are imported inside the functions that use them.
"""
from device_runner.errors import BundleError

from .inspect import inspect_bundle, summary
from .parity import TOLERANCES, ParityError
from .pipeline import ExportOptions, export_bundle
from .source import load_source, resolve_stages

__all__ = ["TOLERANCES", "BundleError", "ExportOptions", "ParityError", "export_bundle",
           "inspect_bundle", "load_source", "resolve_stages", "summary"]
