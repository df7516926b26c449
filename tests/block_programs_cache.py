"""Every block of a tiny model exported with ``export_block``, cached on disk between test runs.

Lowering one block takes 8-18 s on two cores, so a model's programs are exported once per
exporter version: the cache key hashes the exporter's source (block_programs.py,
step_graph.py) and the torch/onnx versions, so any change to them exports again. Blocks
of one structure (``structure_key``) share the first one's programs, as in a bundle: the
programs name tensors without ``blocks.<i>.``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPORTER_SOURCES = ("spfde_edge/export/block_programs.py", "spfde_edge/export/step_graph.py",
                    "spfde_edge/export/graph_rewrites.py")


def cache_key(model_name: str, width: float, size: int) -> str:
    import onnx
    import torch

    digest = hashlib.sha256(f"{model_name} {width} {size} {torch.__version__} {onnx.__version__}".encode())
    for rel in EXPORTER_SOURCES:
        digest.update((REPO / rel).read_bytes())
    return digest.hexdigest()[:16]


def _rename_meta(meta: dict, old: str, new: str, index: int) -> dict:
    def swap(names):
        return [new + n[len(old):] if n.startswith(old) else n for n in names]

    return {**meta, "index": index, "parameters": swap(meta["parameters"]),
            "running_stats": swap(meta["running_stats"]),
            "backward_parameters": swap(meta["backward_parameters"])}


def export_model_blocks(model_name: str, width: float, size: int, root: Path) -> list[dict]:
    """Per block: its folder (``<program>.onnx`` inside) and export_block's metadata."""
    import torch

    from spfde_edge.export.block_programs import export_block, structure_key
    from spfde_edge.models import create_model

    done = root / "blocks.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.manual_seed(0)
    model = create_model(model_name, width=width)
    x = torch.randn(4, 3, size, size)
    blocks, first_of = [], {}
    for i, block in enumerate(model.blocks):
        key = structure_key(model, i, tuple(x.shape[1:]))
        if key in first_of:
            j = first_of[key]
            blocks.append(_rename_meta(blocks[j], f"blocks.{j}.", f"blocks.{i}.", i))
        else:
            first_of[key] = i
            folder = root / f"block_{i:02d}"
            p = export_block(model, i, x, folder)
            blocks.append({"index": i, "folder": str(folder), "parameters": p.parameters,
                           "running_stats": p.running_stats, "backward_parameters": p.backward_parameters,
                           "backward_needs_input": p.backward_needs_input, "saved": p.saved,
                           "input_shape": p.input_shape, "output_shape": p.output_shape})
        with torch.no_grad():
            x = block.eval()(x)
    done.write_text(json.dumps(blocks))
    return blocks
