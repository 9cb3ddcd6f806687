"""Signed bundles: who made a bundle, checked on the station before any of it is used.

`manifest.json` holds the SHA-256 of every other file in the bundle, so a signature over
its exact bytes vouches for the whole bundle: the signature proves the manifest came from
the holder of the key, the hashes prove the files are the ones it names. `ganspect export
--sign KEY` writes `signature.json` next to the manifest (`ganspect.export.signing`); a
station whose `model.trusted_keys` lists public keys refuses, in one line, a bundle that
is unsigned, signed by a key it does not trust, or whose manifest changed after signing.
A station without trusted keys takes unsigned bundles (hashes and golden checks still
apply). Ed25519 through the `cryptography` library; this module only verifies, and
imports `cryptography` only when a station has trusted keys. `docs/security.md` says how
to make keys and rotate them.

    signature.json = {"format": "ganspect.signature/1", "algorithm": "Ed25519",
                      "key_id": "<16 hex>", "signed_file": "manifest.json",
                      "signature": "<base64 of the 64-byte signature over manifest.json's bytes>"}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ganspect.edge.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNATURE_NAME = "signature.json"
SIGNATURE_FORMAT = "ganspect.signature/1"
SIGNED_FILE = "manifest.json"


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["ganspect.signature/1"] = Field(description="Signature file format and version.")
    algorithm: Literal["Ed25519"] = Field(description="Signature algorithm.")
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="key_id() of the public key that verifies it.")
    signed_file: Literal["manifest.json"] = Field(description="The file whose exact bytes are signed.")
    signature: str = Field(description="Base64 of the Ed25519 signature.")


def _cryptography_missing(exc: ImportError) -> ConfigError:
    return ConfigError(
        f"model.trusted_keys needs the Python package cryptography ({exc.name} is missing): "
        "pip install 'ganspect[edge]'"
    )


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the raw 32-byte public key: a short name for logs and files."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def load_public_key(path: Path, key: str = "model.trusted_keys") -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (`openssl pkey -pubout`); ConfigError naming `key` otherwise."""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError as exc:
        raise _cryptography_missing(exc) from exc
    try:
        loaded = load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read the public key {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(
            f"{key}: {path} is not a PEM public key (expected the output of `openssl pkey -in KEY -pubout`)"
        ) from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise ConfigError(f"{key}: {path} is a {type(loaded).__name__.removeprefix('_')}, not an Ed25519 public key")
    return loaded


def verify_signature(root: Path, trusted_keys: Sequence[Path]) -> str:
    """Check `root`'s signature against the trusted public keys; the signing key's id, or BundleError (one line)."""
    try:
        from cryptography.exceptions import InvalidSignature
    except ImportError as exc:
        raise _cryptography_missing(exc) from exc
    keys = {key_id(key): key for key in (load_public_key(path) for path in trusted_keys)}
    trusted = ", ".join(sorted(keys))
    path = root / SIGNATURE_NAME
    if not path.is_file():
        raise BundleError(
            f"model bundle {root} is not signed (no {SIGNATURE_NAME}) and this station takes only "
            f"bundles signed by a trusted key (model.trusted_keys: {trusted}); export it with "
            "`ganspect export --sign KEY`"
        )
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
        signature = Signature.model_validate(raw)
        signed = base64.b64decode(signature.signature, validate=True)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValidationError, binascii.Error) as exc:
        raise BundleError(
            f"{path} is not a valid signature file ({type(exc).__name__}); re-sign the bundle with "
            "`ganspect export --sign KEY`"
        ) from exc
    key = keys.get(signature.key_id)
    if key is None:
        raise BundleError(
            f"model bundle {root} is signed by the key {signature.key_id}, which this station does not "
            f"trust (model.trusted_keys: {trusted})"
        )
    try:
        key.verify(signed, (root / SIGNED_FILE).read_bytes())
    except (InvalidSignature, OSError) as exc:
        raise BundleError(
            f"model bundle {root}: the signature by the key {signature.key_id} does not match its "
            f"{SIGNED_FILE}: the manifest (or the signature) was changed after signing; re-export or "
            "re-copy the bundle"
        ) from exc
    return signature.key_id
