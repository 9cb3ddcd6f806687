"""The station's model folder: verified installs, atomic `current` swaps, the last good bundle kept."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ganspect.edge.errors import BundleError
from ganspect.edge.manifest import load_bundle
from ganspect.edge.model_store import ModelStore


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models" / "current")


def _threshold(link: Path) -> float:
    return load_bundle(link).manifest.model_file().threshold


def test_first_install_links_current(store: ModelStore, make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    installed = store.install(make_bundle(tmp_path / "export-a", threshold=0.11))
    assert store.current_link.is_symlink() and not os.path.isabs(os.readlink(store.current_link))
    assert store.current_link.resolve() == installed.path
    assert installed.path.name.startswith("tiny-test-") and installed.previous is None
    assert _threshold(store.current_link) == 0.11


def test_second_install_keeps_the_first_as_previous(
    store: ModelStore, make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    first = store.install(make_bundle(tmp_path / "export-a", threshold=0.11))
    second = store.install(make_bundle(tmp_path / "export-b", threshold=0.12))
    assert second.previous == first.path
    assert _threshold(store.current_link) == 0.12 and _threshold(store.previous_link) == 0.11
    third = store.install(make_bundle(tmp_path / "export-c", threshold=0.13))
    # Only current and previous stay on disk.
    kept = sorted(p.name for p in store.root.iterdir() if not p.is_symlink())
    assert kept == sorted([second.path.name, third.path.name])


def test_a_damaged_bundle_is_refused_and_nothing_changes(
    store: ModelStore, make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    store.install(make_bundle(tmp_path / "export-a", threshold=0.11))
    before = sorted(p.name for p in store.root.iterdir()), os.readlink(store.current_link)
    damaged = make_bundle(tmp_path / "export-b", threshold=0.12)
    data = bytearray((damaged / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its manifest"):
        store.install(damaged)
    assert (sorted(p.name for p in store.root.iterdir()), os.readlink(store.current_link)) == before
    assert _threshold(store.current_link) == 0.11


def test_a_bundle_whose_graph_disagrees_with_its_manifest_is_refused(
    store: ModelStore, make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    wrong = make_bundle(tmp_path / "export-wrong", graph_shape=(16, 16, 1))  # hashes fine, graph is not 32x32
    with pytest.raises(BundleError, match="does not belong to this model"):
        store.install(wrong)
    assert not store.current_link.exists()


def test_not_a_bundle(store: ModelStore, tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(BundleError, match="not a model bundle"):
        store.install(tmp_path / "photos")


def test_installing_the_current_bundle_again_changes_nothing(
    store: ModelStore, make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "export-a")
    first = store.install(bundle)
    again = store.install(bundle)
    assert again.unchanged and again.path == first.path


def test_restore_previous(store: ModelStore, make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no previous bundle"):
        store.restore_previous()
    store.install(make_bundle(tmp_path / "export-a", threshold=0.11))
    store.install(make_bundle(tmp_path / "export-b", threshold=0.12))
    store.restore_previous()
    assert _threshold(store.current_link) == 0.11


def test_a_hand_copied_folder_is_adopted(store: ModelStore, make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    make_bundle(store.current_link, threshold=0.11)  # copied by hand, as docs/deploy.md once said
    store.install(make_bundle(tmp_path / "export-b", threshold=0.12))
    assert store.current_link.is_symlink() and store.previous_link.is_symlink()
    assert _threshold(store.previous_link) == 0.11 and _threshold(store.current_link) == 0.12


def test_leftovers_of_an_interrupted_install_are_removed(
    store: ModelStore, make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    store.root.mkdir(parents=True)
    stray = store.root / ".incoming-abc123"
    stray.mkdir()
    (stray / "model.onnx").write_bytes(b"half a file")
    store.install(make_bundle(tmp_path / "export-a"))
    assert not stray.exists()
