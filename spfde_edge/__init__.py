"""spfde-edge: SpFDE training (sparse training + progressive layer freezing + data sieving).

The core import stays light: onnx, onnxruntime and executorch are imported only by the
export modules, and the device side (``device_runner``) never imports this package.
"""
__version__ = "0.1.0"
