"""device_runner: keep training an exported SpFDE bundle on an edge board, without PyTorch.

Imports nothing from torch, torchvision or spfde_edge; the bundle's manifest.json is the
only contract with the host.
"""
__version__ = "0.1.0"
