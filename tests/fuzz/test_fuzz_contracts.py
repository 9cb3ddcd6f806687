"""Property-based fuzzing of what the daemon reads from files: the edge config and the bundle manifest.

Whatever the bytes, the reader ends in its own clear error (ConfigError / BundleError, one
line) or a valid object: never another exception. The number of examples is kept small for
the regular suite; GANSPECT_FUZZ_EXAMPLES raises it for a long run (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ganspect.edge.config import load_config
from ganspect.edge.errors import BundleError, ConfigError
from ganspect.edge.manifest import MANIFEST_NAME, load_bundle

EXAMPLES = int(os.environ.get("GANSPECT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

VALID_CONFIG: dict[str, Any] = {
    "station": {"site": "plant1", "line": "line3", "station": "cam1"},
    "model": {"bundle": "bundle", "precision": "auto", "intra_op_threads": 1},
    "source": {"uri": "parts.avi", "loop": False},
    "mqtt": {
        "enabled": True,
        "host": "127.0.0.1",
        "port": 1883,
        "prefix": "ganspect",
        "qos": 1,
        "outbox": {"max_messages": 1000, "when_full": "drop_oldest"},
    },
    "data": {"dir": "data"},
    "display": {"window": "off", "heatmap": True},
    "run": {"max_frames": 10},
}

# JSON-like values, nested a little: what a YAML document can hold.
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


def _paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path of a nested dict (sections and leaves)."""
    found = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.append((*prefix, key))
            found.extend(_paths(value, (*prefix, key)))
    return found


CONFIG_PATHS = _paths(VALID_CONFIG)


def _mutate(tree: dict[str, Any], path: tuple[str, ...], action: str, value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(tree))
    node = copy
    for key in path[:-1]:
        node = node[key]
    if action == "delete":
        node.pop(path[-1], None)
    elif action == "replace":
        node[path[-1]] = value
    else:  # an unknown sibling key
        node[f"{path[-1]}_x"] = value
    return copy


def _expect_clean(read: Callable[[], Any], error: type[Exception]) -> None:
    try:
        read()
    except error as exc:
        message = str(exc)
        assert message and "\n" not in message.strip(), f"not one line: {message!r}"
        assert "Traceback" not in message


@FUZZ
@given(path=st.sampled_from(CONFIG_PATHS), action=st.sampled_from(["delete", "replace", "add"]), value=values)
def test_mutated_configs_load_or_name_the_problem(
    tmp_path: Path, path: tuple[str, ...], action: str, value: Any
) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(yaml.safe_dump(_mutate(VALID_CONFIG, path, action, value)), encoding="utf-8")
    _expect_clean(lambda: load_config(config), ConfigError)


@FUZZ
@given(document=values)
def test_random_yaml_documents(tmp_path: Path, document: Any) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(yaml.safe_dump(document), encoding="utf-8")
    _expect_clean(lambda: load_config(config), ConfigError)


@FUZZ
@given(text=st.text(max_size=300))
def test_random_text_as_config(tmp_path: Path, text: str) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(text, encoding="utf-8")
    _expect_clean(lambda: load_config(config), ConfigError)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_config(tmp_path: Path, data: bytes) -> None:
    config = tmp_path / "edge.yaml"
    config.write_bytes(data)
    _expect_clean(lambda: load_config(config), ConfigError)


@pytest.fixture
def valid_manifest(tiny_bundle: Path) -> dict[str, Any]:
    return json.loads((tiny_bundle / MANIFEST_NAME).read_text(encoding="utf-8"))


@pytest.fixture
def model_bytes(tiny_bundle: Path) -> bytes:
    return (tiny_bundle / "model.onnx").read_bytes()


@FUZZ
@given(data=st.data(), action=st.sampled_from(["delete", "replace", "add"]), value=values)
def test_mutated_manifests_are_refused_with_a_reason(
    tmp_path: Path, valid_manifest: dict[str, Any], model_bytes: bytes, data: st.DataObject, action: str, value: Any
) -> None:
    path = data.draw(st.sampled_from(_paths(valid_manifest)))
    root = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example: the fixture's tmp_path is shared
    (root / "model.onnx").write_bytes(model_bytes)
    (root / MANIFEST_NAME).write_text(json.dumps(_mutate(valid_manifest, path, action, value)), encoding="utf-8")
    _expect_clean(lambda: load_bundle(root), BundleError)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_manifest(tmp_path: Path, model_bytes: bytes, data: bytes) -> None:
    root = tmp_path / "bundle"
    root.mkdir(exist_ok=True)
    (root / "model.onnx").write_bytes(model_bytes)
    (root / MANIFEST_NAME).write_bytes(data)
    _expect_clean(lambda: load_bundle(root), BundleError)
