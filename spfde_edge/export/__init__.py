"""``python -m spfde_edge.export``: a deployable SpFDE bundle, one stage per freezing point.

Stage k = blocks [0, k) frozen: the prefix as inference graphs (ExecuTorch .pte with XNNPACK,
ONNX), the suffix as ONNX Runtime on-device training artifacts with masks in the graph, and
a manifest.json (schema: manifest.schema.json, format: docs/bundle.md). Heavy dependencies
(onnx, onnxruntime, executorch) are imported inside the functions that use them.
"""
from .bundle import ExportOptions, export_bundle, inspect_bundle
from .manifest import BundleError, ParityError

__all__ = ["BundleError", "ExportOptions", "ParityError", "export_bundle", "inspect_bundle"]
