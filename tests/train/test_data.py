"""Data loading from real files: MVTec layout written by the synthesizer, plain folders, bad inputs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from ganspect.edge.errors import GanspectError
from ganspect.train.data import ImageSet, is_mvtec_layout, load_normal_images, load_test_set, split_holdout
from ganspect.train.synth import DEFECT_KINDS, synthesize_dataset


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    synthesize_dataset(root, size=48, n_train=5, n_test_good=3, n_test_bad=8, seed=11)
    return root


def test_mvtec_layout_is_recognised(mvtec: Path, tmp_path: Path) -> None:
    assert is_mvtec_layout(mvtec)
    assert not is_mvtec_layout(tmp_path)


@pytest.mark.parametrize("channels", [1, 3])
def test_normal_images_shapes_and_pixels(mvtec: Path, channels: int) -> None:
    normals = load_normal_images(mvtec, size=32, channels=channels)
    assert normals.images.shape == (5, 32, 32, channels) and normals.images.dtype == np.uint8
    assert normals.labels.dtype == np.int64 and not normals.labels.any()
    assert normals.masks is None
    assert normals.names == [f"train/good/{i:03d}.png" for i in range(5)]
    assert normals.kinds == ["good"] * 5
    # The same reduction the edge applies to a camera frame.
    colour = cv2.resize(cv2.imread(str(mvtec / "train/good/002.png")), (32, 32), interpolation=cv2.INTER_AREA)
    expected = colour if channels == 3 else cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)[..., None]
    assert np.array_equal(normals.images[2], expected)


def test_test_set_labels_kinds_and_masks(mvtec: Path) -> None:
    test = load_test_set(mvtec, size=48, channels=3)
    assert len(test) == 11
    assert test.kinds[:3] == ["good"] * 3
    assert sorted(set(test.kinds[3:])) == sorted(DEFECT_KINDS)
    assert test.labels.tolist() == [0] * 3 + [1] * 8
    assert test.masks is not None and test.masks.shape == (11, 48, 48) and test.masks.dtype == np.uint8
    assert set(np.unique(test.masks)) == {0, 1}
    assert not test.masks[:3].any()
    for i in range(3, 11):
        kind, stem = test.kinds[i], Path(test.names[i]).stem
        on_disk = cv2.imread(str(mvtec / "ground_truth" / kind / f"{stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(test.masks[i], (on_disk >= 128).astype(np.uint8)), test.names[i]
        assert test.masks[i].any()


def test_test_set_masks_are_resized_and_stay_binary(mvtec: Path) -> None:
    test = load_test_set(mvtec, size=24, channels=1)
    assert test.images.shape == (11, 24, 24, 1)
    assert test.masks is not None and test.masks.shape == (11, 24, 24)
    assert set(np.unique(test.masks)) == {0, 1}


def test_test_set_without_ground_truth_has_no_masks(mvtec: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(mvtec, root)
    shutil.rmtree(root / "ground_truth")
    test = load_test_set(root, size=32, channels=3)
    assert test.masks is None
    assert test.labels.sum() == 8


def test_missing_mask_file_is_named(mvtec: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(mvtec, root)
    (root / "ground_truth" / "dent" / "000_mask.png").unlink()
    with pytest.raises(GanspectError, match=re.escape("ground_truth/dent/000_mask.png")):
        load_test_set(root, size=32, channels=3)


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def test_plain_folder_loads_every_image_recursively_in_sorted_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _write(tmp_path / "b.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    _write(tmp_path / "a.jpg", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    _write(tmp_path / "shift2" / "c.bmp", rng.integers(0, 256, (30, 30), dtype=np.uint8))  # a grey file
    _write(tmp_path / "shift2" / "d.TIF", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    (tmp_path / "readme.txt").write_text("not an image")
    for channels in (1, 3):
        normals = load_normal_images(tmp_path, size=16, channels=channels)
        assert normals.names == ["a.jpg", "b.png", "shift2/c.bmp", "shift2/d.TIF"]
        assert normals.images.shape == (4, 16, 16, channels)
    grey = cv2.imread(str(tmp_path / "shift2" / "c.bmp"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(normals.images[2, ..., 0], cv2.resize(grey, (16, 16), interpolation=cv2.INTER_AREA))


def test_missing_and_empty_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(GanspectError, match="does not exist"):
        load_normal_images(tmp_path / "nope", size=32, channels=3)
    with pytest.raises(GanspectError, match="no images found"):
        load_normal_images(tmp_path, size=32, channels=3)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(GanspectError, match=r"no images found.*train/good"):
        load_normal_images(tmp_path, size=32, channels=3)
    with pytest.raises(GanspectError, match="no test/ folder"):
        load_test_set(tmp_path, size=32, channels=3)
    with pytest.raises(GanspectError, match="channels"):
        load_normal_images(tmp_path, size=32, channels=2)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "ok.png", np.zeros((8, 8, 3), dtype=np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(GanspectError, match=re.escape("broken.png")):
        load_normal_images(tmp_path, size=8, channels=3)


def _normals(n: int) -> ImageSet:
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), dtype=np.uint8)
    return ImageSet(
        images=images,
        labels=np.zeros(n, dtype=np.int64),
        masks=None,
        names=[f"{i:03d}.png" for i in range(n)],
        kinds=["good"] * n,
    )


def test_split_holdout_is_deterministic_disjoint_and_complete() -> None:
    normals = _normals(20)
    train, val = split_holdout(normals, 0.25, seed=3)
    again_train, again_val = split_holdout(normals, 0.25, seed=3)
    other_train, _ = split_holdout(normals, 0.25, seed=4)
    assert (len(train), len(val)) == (15, 5)
    assert train.names == again_train.names and val.names == again_val.names
    assert train.names != other_train.names
    assert sorted(train.names + val.names) == normals.names
    # Images travel with their names.
    assert [int(im[0, 0, 0]) for im in val.images] == [int(n[:3]) for n in val.names]


def test_split_holdout_bounds() -> None:
    train, val = split_holdout(_normals(3), 0.01, seed=0)
    assert (len(train), len(val)) == (2, 1)  # at least one held out
    train, val = split_holdout(_normals(3), 0.0, seed=0)
    assert (len(train), len(val)) == (3, 0) and val.images.shape == (0, 4, 4, 1)
    with pytest.raises(GanspectError, match="too few"):
        split_holdout(_normals(1), 0.5, seed=0)
    with pytest.raises(GanspectError, match="fraction"):
        split_holdout(_normals(5), 1.0, seed=0)
