"""Loading image data sets: the MVTec AD layout and plain folders of normal images.

Images are cut to the configured region of interest (`tiling.roi`), then either resized
with ``cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)`` (tiling mode
``resize``), the very call the edge daemon applies to camera frames, or kept at their
native pixels (mode ``tiles``; an image smaller than one tile is padded by repeating its
border), so training and inference see the same pixels. Native images of one size are
stacked into one array; images of several sizes stay a list. Colour images stay in OpenCV's BGR order; grayscale is
``cv2.cvtColor(BGR2GRAY)`` of the colour read, so colour and grey files both load either
way. Masks are resized with INTER_NEAREST and binarised at 128.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ganspect.edge.errors import GanspectError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"


@dataclass
class ImageSet:
    # uint8 (N, H, W, C); C = 1 (gray) or 3 (BGR, OpenCV order); a list of (H_i, W_i, C) for native images of
    # several sizes
    images: Any
    labels: np.ndarray  # int64 (N,): 0 normal, 1 anomalous
    masks: Any  # uint8 (N, H, W) with values 0/1 (all zero for normal images), a list like images; None: no masks
    names: list[str]  # path of each image relative to the data root
    kinds: list[str]  # "good" or the defect folder name

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: np.ndarray | list[int]) -> ImageSet:
        """The images at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)

        def pick(values: Any) -> Any:
            return [values[i] for i in idx] if isinstance(values, list) else values[idx]

        return ImageSet(
            images=pick(self.images),
            labels=self.labels[idx],
            masks=None if self.masks is None else pick(self.masks),
            names=[self.names[i] for i in idx],
            kinds=[self.kinds[i] for i in idx],
        )


def is_mvtec_layout(root: Path) -> bool:
    """True when `root` holds an MVTec AD style ``train/good`` folder."""
    return (Path(root) / "train" / GOOD).is_dir()


def _check_args(root: Path, size: int, channels: int) -> None:
    if size < 1:
        raise GanspectError(f"image size must be positive, got {size}")
    if channels not in (1, 3):
        raise GanspectError(f"channels must be 1 (gray) or 3 (BGR colour), got {channels}")
    if not root.is_dir():
        raise GanspectError(f"data folder {root} does not exist or is not a folder")


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read(path: Path, flags: int) -> np.ndarray:
    # imdecode of the bytes, not imread: it handles any path the OS does (non-ASCII too)
    # and gives None, not a crash, on a file that is not an image.
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise GanspectError(f"cannot read image {path}: {exc.strerror}") from None
    try:
        image = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as exc:  # e.g. a header claiming more pixels than OpenCV will allocate
        raise GanspectError(
            f"cannot decode image {path}: OpenCV refused it ({str(exc).strip().splitlines()[-1]})"
        ) from None
    if image is None:
        raise GanspectError(f"cannot decode image {path}: not a readable image file")
    return image


@dataclass(frozen=True)
class Framing:
    """How an image becomes model input: the ROI, then resize to `size` or native pixels (tiles)."""

    size: int
    tiles: bool = False
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height

    @classmethod
    def of(cls, size: int, tiling: Any = None) -> Framing:
        """From a training config's `tiling` section (None = resize the whole image)."""
        if tiling is None:
            return cls(size)
        roi = tiling.roi
        return cls(size, tiling.mode == "tiles", None if roi is None else (roi.x, roi.y, roi.width, roi.height))

    def apply(self, image: np.ndarray, path: Path, interpolation: int) -> np.ndarray:
        if self.roi is not None:
            x, y, w, h = self.roi
            if x + w > image.shape[1] or y + h > image.shape[0]:
                raise GanspectError(
                    f"{path}: tiling.roi ({x},{y}) {w}x{h} does not fit in the {image.shape[1]}x{image.shape[0]} image"
                )
            image = image[y : y + h, x : x + w]
        if not self.tiles:
            return cv2.resize(image, (self.size, self.size), interpolation=interpolation)
        short_y, short_x = max(0, self.size - image.shape[0]), max(0, self.size - image.shape[1])
        if short_y or short_x:  # smaller than one tile: repeat the border rather than squash the part
            image = cv2.copyMakeBorder(image, 0, short_y, 0, short_x, cv2.BORDER_REPLICATE)
        return image


def read_image(path: Path, size: int, channels: int, framing: Framing | None = None) -> np.ndarray:
    """Read one image as uint8 (size, size, channels), or native (H, W, channels) in tile mode: BGR or gray."""
    image = _read(path, cv2.IMREAD_COLOR)  # (H, W, 3) BGR whatever the file holds
    image = (framing or Framing(size)).apply(image, path, cv2.INTER_AREA)
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[..., None]
    return image


def read_mask(path: Path, size: int, framing: Framing | None = None) -> np.ndarray:
    """Read one mask as uint8 (size, size), or native in tile mode, with values 0/1 (pixels >= 128 are defect)."""
    mask = _read(path, cv2.IMREAD_GRAYSCALE)
    mask = (framing or Framing(size)).apply(mask, path, cv2.INTER_NEAREST)
    return (mask >= 128).astype(np.uint8)


def stack_if_uniform(arrays: list[np.ndarray]) -> Any:
    """One array when every item has the same shape, else the list itself."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    return arrays


def _stack(paths: list[Path], size: int, channels: int, framing: Framing | None = None) -> Any:
    if framing is None or not framing.tiles:
        images = np.empty((len(paths), size, size, channels), dtype=np.uint8)
        for i, path in enumerate(paths):
            images[i] = read_image(path, size, channels, framing)
        return images
    return stack_if_uniform([read_image(path, size, channels, framing) for path in paths])


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def load_normal_images(root: Path, size: int, channels: int, framing: Framing | None = None) -> ImageSet:
    """Load the normal (good) images: ``train/good`` of an MVTec layout, else every image under `root`.

    In a plain folder, image files (png, jpg, jpeg, bmp, tif, tiff) in `root` and its
    sub-folders are loaded in sorted path order.
    """
    root = Path(root)
    _check_args(root, size, channels)
    mvtec = is_mvtec_layout(root)
    folder = root / "train" / GOOD if mvtec else root
    paths = _image_files(folder, recursive=not mvtec)
    if not paths:
        where = f"{folder} (MVTec layout: train/good)" if mvtec else f"{folder} or its sub-folders"
        raise GanspectError(f"no images found in {where}; expected {', '.join(sorted(IMAGE_SUFFIXES))} files")
    n = len(paths)
    return ImageSet(
        images=_stack(paths, size, channels, framing),
        labels=np.zeros(n, dtype=np.int64),
        masks=None,
        names=[_relative(p, root) for p in paths],
        kinds=[GOOD] * n,
    )


def _mask_path(root: Path, kind: str, image: Path) -> Path:
    return root / "ground_truth" / kind / f"{image.stem}_mask.png"


def load_test_set(root: Path, size: int, channels: int, framing: Framing | None = None) -> ImageSet:
    """Load an MVTec ``test/`` folder: ``good`` (label 0) and every defect folder (label 1).

    Masks come from ``ground_truth/<defect>/<stem>_mask.png`` (all zero for good images);
    `masks` is None when the data set has no ``ground_truth`` folder at all. Folders are
    read in sorted order, ``good`` first.
    """
    root = Path(root)
    _check_args(root, size, channels)
    test = root / "test"
    if not test.is_dir():
        raise GanspectError(
            f"{root} has no test/ folder: a test set needs the MVTec layout "
            "(test/good, test/<defect>, optional ground_truth/<defect>)"
        )
    kinds = sorted((d.name for d in test.iterdir() if d.is_dir()), key=lambda k: (k != GOOD, k))
    entries = [(kind, path) for kind in kinds for path in _image_files(test / kind, recursive=False)]
    if not entries:
        raise GanspectError(f"no images found in the sub-folders of {test}")
    has_truth = (root / "ground_truth").is_dir()

    images = _stack([p for _, p in entries], size, channels, framing)
    masks: Any = None
    if has_truth:
        masks = [np.zeros(image.shape[:2], dtype=np.uint8) for image in images]
        for i, (kind, path) in enumerate(entries):
            if kind == GOOD:
                continue
            mask_path = _mask_path(root, kind, path)
            if not mask_path.is_file():
                raise GanspectError(f"no mask for {_relative(path, root)}: expected {_relative(mask_path, root)}")
            masks[i] = read_mask(mask_path, size, framing)
        masks = stack_if_uniform(masks)
    return ImageSet(
        images=images,
        labels=np.array([0 if kind == GOOD else 1 for kind, _ in entries], dtype=np.int64),
        masks=masks,
        names=[_relative(p, root) for _, p in entries],
        kinds=[kind for kind, _ in entries],
    )


def labelled_anomalies(config: Any) -> Any:
    """The known-bad images of `calibration.anomalies` for the f1_optimal threshold, framed as training frames
    its normals; None for the other methods."""
    if config.calibration.threshold != "f1_optimal":
        return None
    assert config.calibration.anomalies is not None  # the config validator guarantees it
    size = config.model.image_size
    framing = Framing.of(size, config.tiling)
    return load_normal_images(config.calibration.anomalies, size, config.model.channels, framing).images


def held_out_images(config: Any, source: Path) -> Any:
    """A run's held-out normal training images, drawn again exactly as training drew them; None if gone."""
    if not source.exists():
        return None
    size = config.model.image_size
    images = load_normal_images(source, size, config.model.channels, Framing.of(size, config.tiling))
    _, held = split_holdout(images, config.data.holdout, config.train.seed)
    return held.images


def split_holdout(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split normal images into (train, held-out validation), deterministically by `seed`.

    The held-out part has round(N * fraction) images, at least one when fraction > 0, and
    the train part keeps at least one. Both keep the original order of their images.
    """
    if not 0.0 <= fraction < 1.0:
        raise GanspectError(f"hold-out fraction must be in [0, 1), got {fraction}")
    n = len(images)
    n_val = 0 if fraction == 0 else max(1, round(n * fraction))
    if n - n_val < 1:
        raise GanspectError(
            f"{n} image(s) are too few to hold out {fraction:.0%} for validation and still train on at least one"
        )
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return images.subset(train_idx), images.subset(val_idx)
