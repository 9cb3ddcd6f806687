"""Station scale: native-pixel tiles from training to the edge, pseudo-defects, the segmentation head.

Uses real DeepPCB boards (../shared/data/deeppcb), cut to a small non-square region so
that a few training steps run in seconds.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ganspect.edge.config import InspectionConfig
from ganspect.edge.errors import ConfigError
from ganspect.edge.inspector import Inspector
from ganspect.edge.manifest import load_bundle
from ganspect.edge.scorer import Scorer
from ganspect.export.bundle import export_run
from ganspect.train.calibrate import score_tiled, tile_origins
from ganspect.train.config import config_from_dict, fit_tiles_to_images
from ganspect.train.data import Framing, load_normal_images, load_test_set
from ganspect.train.evaluate import evaluate_run
from ganspect.train.loop import CropPool, build_for, load_run_model, read_run_config, train
from ganspect.train.pseudo_defects import KINDS, paint, paint_frames

DEEPPCB = Path(__file__).resolve().parents[3] / "shared" / "data" / "deeppcb"
ROI = {"x": 40, "y": 60, "width": 200, "height": 120}  # 200x120: neither square nor a multiple of the tile


@pytest.fixture(scope="module")
def boards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec-layout copy of DeepPCB: 16 training boards, 3 good and 3 defective test boards with masks."""
    if not DEEPPCB.is_dir():
        pytest.fail(f"the shared DeepPCB data is missing at {DEEPPCB} (see ../shared/data/README.md)")
    root = tmp_path_factory.mktemp("deeppcb") / "boards"

    def with_defect_in_roi(path: Path) -> bool:
        mask = cv2.imread(str(DEEPPCB / "ground_truth/defect" / f"{path.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
        return bool(mask[ROI["y"] : ROI["y"] + ROI["height"], ROI["x"] : ROI["x"] + ROI["width"]].any())

    for folder, count in (("train/good", 16), ("test/good", 3), ("test/defect", 3)):
        (root / folder).mkdir(parents=True)
        paths = sorted((DEEPPCB / folder).iterdir())
        if folder == "test/defect":
            paths = [p for p in paths if with_defect_in_roi(p)]
        for path in paths[:count]:
            shutil.copy(path, root / folder / path.name)
            if folder == "test/defect":
                (root / "ground_truth/defect").mkdir(parents=True, exist_ok=True)
                mask = DEEPPCB / "ground_truth/defect" / f"{path.stem}_mask.png"
                shutil.copy(mask, root / "ground_truth/defect" / mask.name)
    return root


def tiled_config(**model: object) -> object:
    return config_from_dict(
        {
            "model": {
                "image_size": 32,
                "channels": 1,
                "latent": "spatial",
                "latent_stride": 4,
                "latent_dim": 8,
                "base_width": 8,
                "segmentation_head": True,
                "head_width": 4,
                "scoring": "segmentation",
                "heatmap_sigma": 1.0,
                **model,
            },
            "tiling": {"mode": "tiles", "overlap": 8, "roi": ROI},
            "pseudo_defects": {"enabled": True},
            "data": {"holdout": 0.25},
            "train": {"steps": 6, "batch_size": 8, "threads": 2, "log_every": 2},
        }
    )


def test_tile_mode_loads_native_pixels_of_the_roi_and_pads_what_is_smaller_than_a_tile(boards: Path) -> None:
    images = load_normal_images(boards, 32, 1, Framing(32, tiles=True, roi=(40, 60, 200, 120))).images
    assert images.shape == (16, 120, 200, 1)  # native pixels: nothing squashed
    raw = cv2.imread(str(sorted((boards / "train/good").iterdir())[0]), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(images[0, ..., 0], raw[60:180, 40:240])
    small = load_normal_images(boards, 256, 1, Framing(256, tiles=True, roi=(0, 0, 200, 120))).images
    assert small.shape == (16, 256, 256, 1)  # padded up to one tile by repeating the border
    assert np.array_equal(small[0, :120, :200, 0], raw[:120, :200])
    assert np.array_equal(small[0, 200, :200, 0], raw[119, :200])
    test = load_test_set(boards, 32, 1, Framing(32, tiles=True, roi=(40, 60, 200, 120)))
    assert test.masks.shape == (6, 120, 200) and test.masks[3:].any() and not test.masks[:3].any()


def test_pseudo_defects_mark_exactly_the_pixels_they_changed() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 48, 40, generator=gen) * 2 - 1
    for kind in KINDS:
        damaged, mask = paint(x, 1.0, [kind], torch.Generator().manual_seed(1))
        changed = (damaged - x).abs().amax(dim=1, keepdim=True) > 3 / 127.5
        assert mask.sum() > 0, kind
        assert not (mask.bool() & ~changed).any(), f"{kind}: a pixel marked as defect did not change"
        untouched = (mask == 0) & changed
        # Outside the mark only the soft rim of a blob or a scratch may move (by less than half the way).
        assert untouched.float().mean() < 0.02, kind
    same, empty = paint(x, 1e-9, list(KINDS), torch.Generator().manual_seed(2))
    assert torch.equal(same, x) and empty.sum() == 0
    again = paint(x, 0.5, list(KINDS), torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(again, paint(x, 0.5, list(KINDS), torch.Generator().manual_seed(3))))
    with pytest.raises(ValueError, match="pseudo-defect kinds"):
        paint(x, 0.5, ["stain"], gen)


def test_painted_frames_get_one_defect_each_inside_one_training_sized_square() -> None:
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (12, 90, 150, 1), np.uint8)
    painted = paint_frames(frames, 32, list(KINDS), seed=7)
    assert painted.shape == frames.shape and painted.dtype == np.uint8
    for before, after in zip(frames, painted):
        rows, cols = np.nonzero((before != after).any(axis=-1))
        assert len(rows) > 0
        assert rows.max() - rows.min() < 32 and cols.max() - cols.min() < 32
    assert np.array_equal(painted, paint_frames(frames, 32, list(KINDS), seed=7))
    # Frames of different sizes come as a list and go back as one; a window larger than a frame fits in it.
    mixed = [frames[0], frames[1, :40, :70]]
    out = paint_frames(mixed, 64, ["scratch"], seed=8)
    assert isinstance(out, list) and [o.shape for o in out] == [m.shape for m in mixed]
    assert (out[1] != mixed[1]).any()


def test_flat_fills_and_scratches_on_a_binary_board_keep_it_binary() -> None:
    # A binarised board has two tones; grey defects only would be a shortcut that no real defect offers.
    board = (torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(4)) > 0.5).float() * 2 - 1
    for kind in ("scratch", "perlin"):
        damaged, mask = paint(board, 1.0, [kind], torch.Generator().manual_seed(5))
        inside = damaged[mask.bool()]
        assert mask.sum() > 0 and (inside.abs() > 0.99).float().mean() > 0.3, kind


def test_crops_are_model_sized_pieces_of_the_native_images() -> None:
    images = np.arange(2 * 50 * 70, dtype=np.uint8).reshape(2, 50, 70, 1)
    crops = CropPool(images, 32, seed=0).sample(20).numpy()
    assert crops.shape == (20, 32, 32, 1)
    for crop in crops:
        found = [
            (i, y, x)
            for i in range(2)
            for y in range(19)
            for x in range(39)
            if np.array_equal(images[i, y : y + 32, x : x + 32], crop)
        ]
        assert found


def test_tile_mode_trains_evaluates_at_the_station_resolution_and_exports_its_tiling(
    boards: Path, tmp_path: Path
) -> None:
    run = train(tiled_config(heatmap_spread=2), boards, tmp_path / "run")
    metrics = evaluate_run(run, boards, report=True)
    assert metrics["n_test_good"] == 3 and metrics["n_test_bad"] == 3
    assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert Path(metrics["report"]).is_file()

    # Calibration scored the held-out boards tile by tile, the worst tile deciding: recompute it.
    model, _ = load_run_model(run)
    held = load_normal_images(boards, 32, 1, Framing(32, True, (40, 60, 200, 120)))
    names = json.loads((run / "run.json").read_text(encoding="utf-8"))["holdout_names"]
    held_images = held.images[[held.names.index(n) for n in names]]
    scored = score_tiled(model, held_images, overlap=8)
    assert scored.heatmap.shape == (4, 120, 200)
    cal = json.loads((run / "calibration.json").read_text(encoding="utf-8"))
    assert cal["heatmap_scale"] == pytest.approx(float(scored.residual.max()), rel=1e-5)
    tiles = np.stack([held_images[0][y : y + 32, x : x + 32] for y, x in tile_origins(120, 200, 32, 8)])
    with torch.no_grad():
        tile_scores, _ = model(torch.from_numpy(tiles))
    assert scored.score[0] == pytest.approx(float(tile_scores.max()), rel=1e-5)

    bundle = export_run(run, tmp_path / "bundle", int8=True, force=True, latency_budget_s=0.02)
    manifest = load_bundle(bundle).manifest
    assert manifest.tiling is not None and manifest.tiling.mode == "tiles" and manifest.tiling.overlap == 8
    assert manifest.tiling.roi is not None and manifest.tiling.roi.model_dump() == ROI
    assert manifest.score.source == "segmentation" and manifest.heatmap.spread == 2

    # The edge, told nothing about tiling, cuts a full board exactly as evaluation did and agrees on its score.
    scorer = Scorer.load(bundle, precision="fp32", intra_op_threads=1)
    inspector = Inspector(InspectionConfig())
    inspector.check(scorer.manifest)
    frame = cv2.imread(str(boards / names[0]))
    found = inspector.inspect(frame, scorer, scorer.threshold)
    assert found.tiles == len(tile_origins(120, 200, 32, 8))
    assert found.score.heatmap.shape == (120, 200)
    assert found.score.score == pytest.approx(float(scored.score[0]), rel=1e-3, abs=1e-4)


def test_heatmap_spread_widens_the_map_by_a_max_filter_and_leaves_the_score_alone() -> None:
    config = tiled_config()
    torch.manual_seed(0)
    narrow = build_for(config).eval()
    wide = build_for(config.model_copy(update={"model": config.model.model_copy(update={"heatmap_spread": 3})}))
    wide.load_state_dict(narrow.state_dict())
    wide.eval()
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8))
    with torch.no_grad():
        (score_narrow, map_narrow), (score_wide, map_wide) = narrow(frames), wide(frames)
    assert torch.equal(score_narrow, score_wide)
    assert torch.equal(map_narrow.amax(dim=(1, 2)), map_wide.amax(dim=(1, 2)))
    square = np.ones((7, 7), np.uint8)  # 3 pixels on each side, as OpenCV dilates (border pixels replicated)
    for n, w in zip(map_narrow.numpy(), map_wide.numpy(), strict=True):
        assert np.array_equal(cv2.dilate(n, square, borderType=cv2.BORDER_REPLICATE), w)


def test_anogan_at_station_scale_learns_its_head_in_the_encoder_phase_and_exports_one_graph(
    boards: Path, tmp_path: Path
) -> None:
    config = tiled_config(kind="anogan")
    config = config.model_copy(update={"anogan": config.anogan.model_copy(update={"encoder_steps": 6})})
    run = train(config, boards, tmp_path / "run")

    # The head learns beside E in the encoder phase, never in the GAN phase (pseudo-defects only matter there).
    with (run / "losses.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {row["phase"] for row in rows} == {"gan", "encoder"}
    assert all(row["loss_seg"] == "" for row in rows if row["phase"] == "gan")
    assert all(float(row["loss_seg"]) > 0 for row in rows if row["phase"] == "encoder")

    model, _ = load_run_model(run)
    assert model.cfg.latent == "spatial" and hasattr(model, "segmentation_head")
    bundle = export_run(run, tmp_path / "bundle", int8=False, latency_budget_s=0.02)
    manifest = load_bundle(bundle).manifest
    assert manifest.kind == "anogan" and manifest.score.source == "segmentation"

    # The edge scores a full board as evaluation does, through the same tiles.
    held = load_normal_images(boards, 32, 1, Framing(32, True, (40, 60, 200, 120)))
    scored = score_tiled(model, held.images[:1], overlap=8)
    scorer = Scorer.load(bundle, precision="fp32", intra_op_threads=1)
    inspector = Inspector(InspectionConfig())
    inspector.check(scorer.manifest)
    found = inspector.inspect(cv2.imread(str(boards / held.names[0])), scorer, scorer.threshold)
    assert found.score.score == pytest.approx(float(scored.score[0]), rel=1e-3, abs=1e-4)


def test_small_training_crops_train_a_model_that_scores_larger_tiles(
    boards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sampled: list[tuple[int, ...]] = []
    original = CropPool.sample

    def recording(self: CropPool, n: int) -> torch.Tensor:
        crops = original(self, n)
        sampled.append(tuple(crops.shape[1:3]))
        return crops

    monkeypatch.setattr(CropPool, "sample", recording)
    config = tiled_config(image_size=64)
    config = config.model_copy(update={"tiling": config.tiling.model_copy(update={"train_crop": 32})})
    run = train(config, boards, tmp_path / "run")
    # Two fixed tile-sized sets (BatchNorm statistics, validation), then every training batch at the crop size.
    assert sampled[:2] == [(64, 64), (64, 64)] and set(sampled[2:]) == {(32, 32)} and len(sampled) == 2 + 6

    bundle = export_run(run, tmp_path / "bundle", int8=False, latency_budget_s=0.02)
    assert load_bundle(bundle).manifest.input.height == 64


def test_tiles_shrink_to_fit_images_smaller_than_model_image_size(boards: Path, tmp_path: Path) -> None:
    # The ROI is 200x120: tiles of 256 would be mostly padding; the largest power of two that fits is 64.
    config = tiled_config(image_size=256)
    config = config.model_copy(update={"tiling": config.tiling.model_copy(update={"train_crop": 128})})
    run = train(config, boards, tmp_path / "run")
    trained = read_run_config(run)
    assert (trained.model.image_size, trained.tiling.train_crop) == (64, 64)
    bundle = export_run(run, tmp_path / "bundle", int8=False, latency_budget_s=0.02)
    assert load_bundle(bundle).manifest.input.height == 64


@pytest.mark.parametrize(
    ("side", "size", "crop", "expected"),
    [
        (640, 256, 128, (256, 128)),
        (256, 256, 128, (256, 128)),
        (255, 256, 128, (128, 128)),
        (100, 256, None, (64, None)),
        (20, 64, 32, (32, 32)),
        (640, 64, 128, (64, 128)),
    ],
)
def test_fitted_tile_is_the_largest_power_of_two_in_the_smallest_side(
    side: int, size: int, crop: int | None, expected: tuple[int, int | None]
) -> None:
    config = tiled_config(image_size=size)
    config = config.model_copy(update={"tiling": config.tiling.model_copy(update={"train_crop": crop})})
    fitted = fit_tiles_to_images(config, side)
    assert (fitted.model.image_size, fitted.tiling.train_crop) == expected
    assert fitted.crop_side == min(expected[1] or expected[0], expected[0])  # a crop larger than the tile is the tile
    resized = config.model_copy(
        update={"tiling": config.tiling.model_copy(update={"mode": "resize", "train_crop": None})}
    )
    assert fit_tiles_to_images(resized, side) is resized  # resize mode squashes the image to image_size anyway


@pytest.mark.parametrize(
    "change",
    [
        {"tiling": {"mode": "tiles", "train_crop": 32}, "model": {"image_size": 64}},  # vector latent
        {"tiling": {"mode": "resize", "train_crop": 32}, "model": {"image_size": 64, "latent": "spatial"}},
        {"tiling": {"mode": "tiles", "train_crop": 48}, "model": {"image_size": 64, "latent": "spatial"}},
    ],
)
def test_training_crops_need_tiles_a_spatial_latent_and_a_power_of_two(change: dict) -> None:
    with pytest.raises(ConfigError, match="train_crop"):
        config_from_dict(change)
