"""Ed25519 signatures over a bundle's ``manifest.json``: who vouches for the bundle.

The manifest lists every file of the bundle with its size and sha256, and ``load_bundle``
checks them all before anything is loaded, so a signature over the exact bytes of
``manifest.json`` covers the whole bundle. The signature lives beside it in
``manifest.json.sig`` (JSON: key id and base64 signature). Keys are made by
``python -m device_runner keygen --out keys/ --name NAME``: ``NAME.key`` (PEM PKCS#8, mode
0600, keep it on the build machine) and ``NAME.pub`` (PEM, copy it to the devices). A key's
id is the first 16 hex digits of the sha256 of its raw 32-byte public key. Torch-free.
How to use it: docs/trust.md.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BundleError, TrustError
from .files import atomic_write_json
from .manifest import MANIFEST_NAME

SIGNATURE_NAME = MANIFEST_NAME + ".sig"
SIGNATURE_FORMAT = "spfde-bundle-signature"
SIGNATURE_VERSION = 1
ALGORITHM = "ed25519"
PRIVATE_SUFFIX, PUBLIC_SUFFIX = ".key", ".pub"
NO_KEYS = "not signed (no trusted keys configured)"
RESIGN = ("re-export it with python -m spfde_edge.export --sign-key KEY, or sign the bundle you "
          "trust with python -m device_runner sign BUNDLE --key KEY")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(out: Path, name: str) -> tuple[Path, Path]:
    """Write a new key pair ``out/NAME.key`` (0600) and ``out/NAME.pub``; never overwrites."""
    out = Path(out)
    if not name or "/" in name or name.startswith("."):
        raise TrustError(f"key name {name!r} must be a plain file name such as 'release'")
    private_path, public_path = out / f"{name}{PRIVATE_SUFFIX}", out / f"{name}{PUBLIC_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise TrustError(f"{path} already exists; choose another --name or folder (keys are never overwritten)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL with mode 0600: the private key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise TrustError(f"cannot read signing key {path} ({exc.strerror}); make one with "
                         "python -m device_runner keygen --out keys/") from None
    except (ValueError, TypeError) as exc:
        raise TrustError(f"{path} is not an unencrypted PEM private key ({exc}); make one with "
                         "python -m device_runner keygen --out keys/") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustError(f"{path} is a {type(key).__name__}, not an Ed25519 key; make one with "
                         "python -m device_runner keygen --out keys/")
    return key


def load_trusted_keys(folder: Path) -> dict[str, Ed25519PublicKey]:
    """Every ``*.pub`` key in ``folder`` by key id; an empty or unreadable folder is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrustError(f"trusted keys folder {folder} does not exist; give a folder of NAME.pub "
                         "files made by python -m device_runner keygen")
    keys = {}
    for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}")):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise TrustError(f"trusted key {path} is not a PEM public key ({exc}); remove it or "
                             "copy the NAME.pub written by keygen again") from None
        if not isinstance(key, Ed25519PublicKey):
            raise TrustError(f"trusted key {path} is not an Ed25519 key; use keys made by "
                             "python -m device_runner keygen")
        keys[key_id(key)] = key
    if not keys:
        raise TrustError(f"trusted keys folder {folder} holds no *{PUBLIC_SUFFIX} keys, so no bundle "
                         "could be trusted; copy the signer's NAME.pub into it")
    return keys


def sign_manifest(root: Path, key_path: Path) -> str:
    """Sign ``root/manifest.json`` as it is now with the key in ``key_path``; returns the key id.
    Call it after the manifest is final: any later change to it breaks the signature."""
    key = load_private_key(key_path)
    manifest = (Path(root) / MANIFEST_NAME).read_bytes()
    kid = key_id(key.public_key())
    atomic_write_json(Path(root) / SIGNATURE_NAME, {
        "format": SIGNATURE_FORMAT, "format_version": SIGNATURE_VERSION, "algorithm": ALGORITHM,
        "key_id": kid, "signed_file": MANIFEST_NAME,
        "signature": base64.b64encode(key.sign(manifest)).decode("ascii")})
    return kid


def _read_signature(root: Path) -> tuple[str, bytes] | None:
    """(key id, signature bytes) from ``manifest.json.sig``, or None when the bundle is unsigned."""
    path = Path(root) / SIGNATURE_NAME
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_bytes())
        if data.get("format") != SIGNATURE_FORMAT or data.get("format_version") != SIGNATURE_VERSION \
                or data.get("algorithm") != ALGORITHM:
            raise ValueError(f"not an {ALGORITHM} {SIGNATURE_FORMAT} version {SIGNATURE_VERSION}")
        signature = base64.b64decode(data["signature"], validate=True)
        kid = str(data["key_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise BundleError(f"{path} is not a readable bundle signature ({exc}); copy the bundle again "
                          f"or {RESIGN}") from None
    return kid, signature


def signature_status(root: Path, manifest: bytes, trusted: dict[str, Ed25519PublicKey] | None,
                     keys_dir: str | Path | None = None) -> str:
    """Check the signature over ``manifest`` (the exact bytes that will be parsed).

    With ``trusted`` keys a bundle must be signed by one of them: an unsigned bundle, an
    unknown key or a signature that does not match is a ``BundleError``. Without keys the
    bundle runs and the status only says what it carries. Returns a sentence for logs and reports.
    """
    found = _read_signature(root)
    where = f" in {keys_dir}" if keys_dir is not None else ""
    if trusted is None:
        if found is None:
            return NO_KEYS
        return f"signed by {found[0]}, not verified (no trusted keys configured)"
    if found is None:
        raise BundleError(f"bundle {root} is not signed, and trusted keys are configured{where}; "
                          f"refusing to run it: {RESIGN}")
    kid, signature = found
    key = trusted.get(kid)
    if key is None:
        raise BundleError(f"bundle {root} is signed by key {kid}, which is not among the trusted "
                          f"keys{where} ({', '.join(sorted(trusted))}); add its .pub if you trust "
                          "the signer, or get a bundle signed by a trusted key")
    try:
        key.verify(signature, manifest)
    except InvalidSignature:
        raise BundleError(f"bundle {root}: the signature by key {kid} does not match {MANIFEST_NAME} "
                          f"(the manifest was changed after signing); copy the bundle again or {RESIGN}") from None
    return f"signed by {kid}, verified"
