"""Signing a bundle on the workstation: `ganspect export --sign KEY` (Ed25519, `cryptography`).

The edge only verifies (`ganspect.edge.signature`, which defines the signature file); the
private key never leaves the workstation. `docs/security.md` says how to make and rotate keys.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ganspect.edge.errors import GanspectError
from ganspect.edge.signature import SIGNATURE_FORMAT, SIGNATURE_NAME, SIGNED_FILE, key_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# A pass phrase for an encrypted key file, from the environment (never from the command line: it would show in ps).
PASSPHRASE_ENV = "GANSPECT_SIGN_PASSPHRASE"


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (`openssl genpkey -algorithm ed25519`); GanspectError otherwise."""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError as exc:
        raise GanspectError(
            f"--sign needs the Python package cryptography ({exc.name} is missing): pip install 'ganspect[train]'"
        ) from exc
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = load_pem_private_key(path.read_bytes(), password=passphrase.encode() if passphrase else None)
    except OSError as exc:
        raise GanspectError(f"--sign: cannot read the key {path}: {exc.strerror or exc}") from exc
    except TypeError as exc:  # encrypted without a pass phrase, or a pass phrase for a plain key
        raise GanspectError(
            f"--sign: {path}: {exc}; set {PASSPHRASE_ENV} to the key's pass phrase, or unset it for an unencrypted key"
        ) from exc
    except ValueError as exc:
        raise GanspectError(
            f"--sign: {path} is not a PEM private key, or the pass phrase is wrong (expected the "
            "output of `openssl genpkey -algorithm ed25519`)"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise GanspectError(f"--sign: {path} is a {type(key).__name__.removeprefix('_')}, not an Ed25519 private key")
    return key


def sign_bundle(root: Path, key: Ed25519PrivateKey) -> str:
    """Sign `root/manifest.json` (which holds every other file's hash) into `root/signature.json`; the key's id."""
    ident = key_id(key.public_key())
    signature = key.sign((root / SIGNED_FILE).read_bytes())
    document = {
        "format": SIGNATURE_FORMAT,
        "algorithm": "Ed25519",
        "key_id": ident,
        "signed_file": SIGNED_FILE,
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    (root / SIGNATURE_NAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return ident
