"""``manifest.json``: the only contract between the host export and the device runner.

The schema lives beside this file (``manifest.schema.json``); ``docs/bundle.md`` explains
every field. Paths inside the manifest are relative to the bundle folder.
"""
from __future__ import annotations

import json
from pathlib import Path
# One hasher and one check: the device verifies exactly what the host wrote.
from device_runner.bundle import file_problems, sha256_file

BUNDLE_FORMAT = "spfde-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


class BundleError(ValueError):
    """A bundle that cannot be written or read as asked; the message says what to change."""


class ParityError(BundleError):
    """An exported graph disagrees with PyTorch beyond the tolerance; nothing is written."""


def file_table(root: Path, relative_paths: list[str]) -> dict[str, dict]:
    """``{path: {"sha256", "bytes"}}`` for every bundle file except the manifest itself."""
    return {rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
            for rel in sorted(relative_paths)}


def validate(manifest: dict) -> None:
    """Check ``manifest`` against the JSON Schema (skipped when jsonschema is not installed)."""
    try:
        import jsonschema
    except ImportError:  # a runtime-only install; the format version check still applies
        return
    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        jsonschema.validate(manifest, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BundleError(f"manifest does not match its schema at {where}: {exc.message}") from exc


def write(root: Path, manifest: dict) -> None:
    validate(manifest)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read(root: Path) -> dict:
    """Load and check the manifest of the bundle in ``root``."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST_NAME}; export one with "
                          "python -m spfde_edge.export")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not an spfde bundle manifest")
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{path} has bundle format {manifest.get('format_version')}; this "
                          f"spfde-edge reads {BUNDLE_FORMAT_VERSION}; re-export the bundle")
    validate(manifest)
    return manifest


def verify_files(root: Path, manifest: dict) -> list[str]:
    """Problems with the files the manifest lists (missing, size or sha256 mismatch)."""
    return file_problems(root, manifest["files"])
