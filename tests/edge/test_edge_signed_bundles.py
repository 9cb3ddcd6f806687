"""Signed bundles: a station with trusted keys takes only bundles signed by one of them.

Keys are made with the `openssl` commands docs/security.md gives; bundles are tiny real
ONNX bundles signed by the exporter's own signing code; refusals are checked through the
real `ganspect edge install-model` CLI, the daemon's start-up, and `cmd/reload` over a
real mosquitto to the daemon as a real process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from ganspect.edge.errors import BundleError, ConfigError
from ganspect.edge.manifest import manifest_digest
from ganspect.edge.scorer import Scorer
from ganspect.edge.signature import SIGNATURE_NAME
from ganspect.export.signing import PASSPHRASE_ENV, load_signing_key, sign_bundle

BASE = "gstest/testsite/l1/s1"
# docs/security.md makes keys with openssl: the tests do as it says.
pytestmark = pytest.mark.needs_tools("openssl")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def make_key(tmp_path: Path) -> Callable[[str], tuple[Path, Path]]:
    """make_key(name) -> (private key PEM, public key PEM), as docs/security.md makes them."""

    def make(name: str) -> tuple[Path, Path]:
        private, public = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
        _openssl("genpkey", "-algorithm", "ed25519", "-out", str(private))
        _openssl("pkey", "-in", str(private), "-pubout", "-out", str(public))
        return private, public

    return make


def _signed(bundle: Path, private: Path) -> Path:
    sign_bundle(bundle, load_signing_key(private))
    return bundle


def _reseal(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    edit(raw)
    raw["content_sha256"] = manifest_digest(raw)
    (bundle / "manifest.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")


def _unsigned(bundle: Path, key: Path, other: Path) -> str:
    return "is not signed (no signature.json) and this station takes only bundles signed by a trusted key"


def _other_key(bundle: Path, key: Path, other: Path) -> str:
    _signed(bundle, other)
    return "which this station does not trust (model.trusted_keys: "


def _threshold_changed_after_signing(bundle: Path, key: Path, other: Path) -> str:
    # The audit's forgery (a threshold edited, content_sha256 recomputed) on a signed bundle; 0.2 is a threshold
    # the golden images cannot refute, so only the signature stands in the way.
    _signed(bundle, key)
    _reseal(bundle, lambda raw: raw["files"][0].update(threshold=0.2))
    return "does not match its manifest.json: the manifest (or the signature) was changed after signing"


def _model_changed_after_signing(bundle: Path, key: Path, other: Path) -> str:
    _signed(bundle, key)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    return "model.onnx does not match its manifest (SHA-256"  # the signed manifest holds the file's hash


def _garbage_signature(bundle: Path, key: Path, other: Path) -> str:
    (bundle / SIGNATURE_NAME).write_text('{"format": "ganspect.signature/1"}', encoding="utf-8")
    return "signature.json is not a valid signature file"


REFUSALS = {
    "unsigned": _unsigned,
    "signed by another key": _other_key,
    "threshold changed after signing": _threshold_changed_after_signing,
    "model changed after signing": _model_changed_after_signing,
    "garbage signature": _garbage_signature,
}


@pytest.mark.parametrize("how", list(REFUSALS))
def test_install_model_takes_only_bundles_signed_by_a_trusted_key(
    how, tmp_path, make_key, make_bundle, tiny_video, make_edge_config, ganspect_cli
):
    key, public = make_key("line")
    other, _ = make_key("intruder")
    config = make_edge_config(
        tmp_path / "models" / "current", tiny_video.path, None, model={"trusted_keys": [str(public)]}
    )
    good = ganspect_cli(
        "edge",
        "install-model",
        str(_signed(make_bundle(tmp_path / "good", threshold=0.15), key)),
        "--config",
        str(config),
    )
    assert good.returncode == 0, good.stderr
    assert "verified and installed" in good.stdout
    installed = (tmp_path / "models" / "current").resolve()

    bundle = make_bundle(tmp_path / "bad", threshold=0.15)
    words = REFUSALS[how](bundle, key, other)
    refused = ganspect_cli("edge", "install-model", str(bundle), "--config", str(config))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("ganspect edge: error:")]
    assert len(errors) == 1 and words in errors[0], refused.stderr
    assert (tmp_path / "models" / "current").resolve() == installed, "the station keeps its signed bundle"

    # Without trusted keys the same bundle passes every other check (a resealed threshold of 0.2 included: the
    # golden images cannot refute it); only the signature tells who made it. A changed file fails its hash anyway.
    if how == "model changed after signing":
        with pytest.raises(BundleError, match="does not match its manifest"):
            Scorer.load(bundle)
    else:
        Scorer.load(bundle)


def test_the_daemon_refuses_to_start_with_an_unsigned_bundle(
    tmp_path, make_key, make_bundle, tiny_video, make_edge_config, ganspect_cli
):
    _, public = make_key("line")
    config = make_edge_config(
        make_bundle(tmp_path / "bundle"), tiny_video.path, None, model={"trusted_keys": [str(public)]}
    )
    proc = ganspect_cli("edge", "--config", str(config), "--headless")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ganspect edge: error:")]
    assert len(errors) == 1 and "is not signed (no signature.json)" in errors[0], proc.stderr
    assert proc.stdout == ""


def test_a_trusted_key_that_is_not_an_ed25519_public_key_is_a_config_error_naming_it(
    tmp_path, make_key, make_bundle, tiny_video, make_edge_config
):
    from ganspect.edge.config import load_config

    private, public = make_key("line")
    rsa = tmp_path / "rsa.pub"
    _openssl("genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:1024", "-out", str(tmp_path / "rsa.key"))
    _openssl("pkey", "-in", str(tmp_path / "rsa.key"), "-pubout", "-out", str(rsa))
    cases = [
        (private, "is not a PEM public key"),
        (rsa, "not an Ed25519 public key"),
        (tmp_path / "missing.pub", "cannot read the public key"),
    ]
    for path, words in cases:
        config = make_edge_config(
            make_bundle(tmp_path / "bundle"), tiny_video.path, None, model={"trusted_keys": [str(public), str(path)]}
        )
        with pytest.raises(ConfigError) as err:
            load_config(config)
        line = config.read_text(encoding="utf-8").splitlines().index(f"  - {path}") + 1
        assert f"edge.yaml:{line}: model.trusted_keys[1]: " in str(err.value) and words in str(err.value), err.value


def test_an_encrypted_signing_key_needs_its_pass_phrase_from_the_environment(tmp_path, make_bundle, monkeypatch):
    from ganspect.edge.errors import GanspectError

    key = tmp_path / "enc.key"
    _openssl("genpkey", "-algorithm", "ed25519", "-aes-256-cbc", "-pass", "pass:s3cret", "-out", str(key))
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    with pytest.raises(GanspectError, match=f"set {PASSPHRASE_ENV} to the key's pass phrase"):
        load_signing_key(key)
    monkeypatch.setenv(PASSPHRASE_ENV, "wrong")
    with pytest.raises(GanspectError, match="or the pass phrase is wrong"):
        load_signing_key(key)
    monkeypatch.setenv(PASSPHRASE_ENV, "s3cret")
    assert len(sign_bundle(make_bundle(tmp_path / "bundle"), load_signing_key(key))) == 16


def test_cmd_reload_takes_only_bundles_signed_by_a_trusted_key(
    tmp_path, make_key, make_bundle, make_video, make_edge_config, mosquitto_broker, mqtt_subscriber, edge_daemon
):
    key, public = make_key("line")
    other, _ = make_key("intruder")
    new_key, new_public = make_key("line-2026")
    bundle = _signed(make_bundle(tmp_path / "bundle", threshold=0.15), key)
    video = make_video(tmp_path / "parts.avi", [False] * 9 + [True])
    # Key rotation as docs/security.md describes it: the old and the new key are trusted side by side.
    config = make_edge_config(
        bundle,
        video,
        mosquitto_broker,
        source={"loop": True, "max_fps": 25},
        model={"trusted_keys": [str(public), str(new_public)]},
    )
    sub = mqtt_subscriber(mosquitto_broker.host, mosquitto_broker.port, f"{BASE}/#")
    mes = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-mes-{os.getpid()}")
    mes.connect(mosquitto_broker.host, mosquitto_broker.port)
    mes.loop_start()
    proc = edge_daemon.start(config)

    def reload(command_id: str, replace: Callable[[Path], None]) -> dict[str, Any]:
        shutil.rmtree(bundle)
        replace(bundle)
        mes.publish(f"{BASE}/cmd/reload", json.dumps({"command_id": command_id}), qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for m in sub.on("/cmd/result"):
                answer = json.loads(m.payload)
                if answer["command_id"] == command_id:
                    return answer
            time.sleep(0.05)
        raise AssertionError(f"no answer to {command_id}")

    try:
        assert len(sub.wait_for("/verdict", 3, timeout=30)) >= 3
        unsigned = reload("R-unsigned", lambda root: make_bundle(root, threshold=0.2))
        intruder = reload("R-intruder", lambda root: _signed(make_bundle(root, threshold=0.2), other))
        forged = reload(
            "R-forged", lambda root: _threshold_changed_after_signing(make_bundle(root, threshold=0.15), key, other)
        )
        rotated = reload("R-rotated", lambda root: _signed(make_bundle(root, threshold=0.2), new_key))
        n = len(sub.on("/verdict"))
        verdicts = [json.loads(m.payload) for m in sub.wait_for("/verdict", n + 5, timeout=20)]
    finally:
        mes.loop_stop()
        mes.disconnect()
        _stdout, stderr = edge_daemon.finish(proc)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    for answer, words in [
        (unsigned, "is not signed"),
        (intruder, "which this station does not trust"),
        (forged, "was changed after signing"),
    ]:
        assert (answer["outcome"], answer["code"]) == ("rejected", "bundle_refused"), answer
        assert words in answer["reason"], answer["reason"]
    assert rotated["outcome"] == "done" and rotated["threshold"]["value"] == 0.2, rotated
    # Until the reload of the bundle signed with the new key, every part was judged by the first bundle (0.15).
    thresholds = [v["threshold"]["value"] for v in verdicts]
    assert set(thresholds) == {0.15, 0.2} and thresholds == sorted(thresholds)
