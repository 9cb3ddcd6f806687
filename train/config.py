"""Training configuration: YAML file + `--set key.path=value` overrides, validated strictly.

Every section is a pydantic model with `extra="forbid"` and a description on every field,
so a typo is an error that names the key instead of a setting silently ignored. This
module imports no torch: the CLI validates a config before the trainer loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ganspect.edge.config import RoiConfig, read_yaml_file
from ganspect.edge.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSection(_Section):
    kind: Literal["efficient_gan", "anogan"] = Field(
        "efficient_gan",
        description="Model family: efficient_gan (BiGAN with encoder) or anogan (DCGAN, "
        "latent search, plus a one-pass encoder trained afterwards; see the anogan section).",
    )
    image_size: int = Field(
        64,
        description="Square input side in pixels: a power of two from 32 to 256. In tiling mode tiles the largest "
        "tile: when the training images are smaller, the largest power of two that fits them.",
    )
    channels: Literal[1, 3] = Field(3, description="1 = grayscale, 3 = colour (BGR, as OpenCV reads it).")
    latent_dim: int = Field(64, ge=2, le=1024, description="Size of the latent code z = E(x).")
    base_width: int = Field(16, ge=4, le=256, description="Feature maps of the first conv stage; doubles per stage.")
    lambda_: float = Field(
        0.1, alias="lambda", ge=0.0, le=1.0, description="Score weight: A(x) = (1 - lambda) * L_R + lambda * L_D."
    )
    discrimination: Literal["feature_matching", "cross_entropy"] = Field(
        "feature_matching",
        description="L_D: feature_matching = mean |f_D(x, E(x)) - f_D(G(E(x)), E(x))| over "
        "D's joint features; cross_entropy = BCE(D(x, E(x)), real) (Efficient GAN only; AnoGAN always "
        "feature-matches).",
    )
    residual_reduction: Literal["peak", "mean"] = Field(
        "peak",
        description="L_R from the per-pixel residual: peak = max of the smoothed residual (local defects), "
        "mean = the papers' mean absolute residual (whole-image anomalies such as another MNIST digit).",
    )
    residual_polarity: Literal["both", "darker", "brighter"] = Field(
        "both",
        description="Which way a pixel must differ from its reconstruction to count in the residual r: both = "
        "|x - G(E(x))| (the papers); darker = only where the image is darker than its reconstruction, for parts "
        "whose defects are always dark (electroluminescence: cracks and dead areas emit no light), so that "
        "bright specks of a normal part stop raising the score; brighter = the reverse.",
    )
    heatmap_sigma: float | None = Field(
        None, ge=0.0, description="Gaussian smoothing of the heatmap in pixels; null = image_size / 32 (2 px at 64)."
    )
    heatmap_spread: int = Field(
        0,
        ge=0,
        le=64,
        description="Widen the heatmap by this many pixels on each side (a max filter after the smoothing), so "
        "that a one-pixel crack lights a region an operator sees; the score (the map's peak) is unchanged.",
    )
    norm: Literal["batch", "group", "none"] = Field(
        "batch", description="Normalisation in E and G; their BatchNorm statistics are re-estimated after training."
    )
    spectral_norm: bool = Field(True, description="Spectral normalisation on D's layers (stabilises the GAN).")
    d_dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout in D during training (BiGAN practice).")
    latent: Literal["vector", "spatial"] = Field(
        "vector",
        description="vector = one latent_dim code per image (the papers); spatial = a map of codes, one "
        "per latent_stride x latent_stride cell: fully convolutional, keeps the detail of textured parts.",
    )
    latent_stride: int = Field(
        8,
        description="Spatial latent only: image pixels per latent cell (power of two, "
        "2 to 32, at most image_size / 4).",
    )
    segmentation_head: bool = Field(
        False,
        description="A small defect-segmentation network on (x, G(E(x)), |x - G(E(x))|), trained to mark "
        "the pseudo-defects painted on normal images (train.pseudo_defects); AnoGAN trains it in its encoder phase.",
    )
    head_width: int = Field(8, ge=2, le=64, description="Feature maps of the segmentation head's first stage.")
    scoring: Literal["residual", "segmentation"] = Field(
        "residual",
        description="Where score and heatmap come from: residual = A(x) = (1 - lambda) L_R + lambda L_D "
        "and the smoothed residual; segmentation = the peak of the head's smoothed defect map, and that map.",
    )

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 32 or v > 256 or v & (v - 1):
            raise ValueError(f"must be a power of two from 32 to 256, got {v}")
        return v

    @model_validator(mode="after")
    def _anogan_feature_matching(self) -> ModelSection:
        if self.kind == "anogan" and self.discrimination != "feature_matching":
            raise ValueError("discrimination: AnoGAN scores with feature_matching only")
        if self.scoring == "segmentation" and not self.segmentation_head:
            raise ValueError("scoring: segmentation needs segmentation_head: true")
        if self.latent == "spatial" and (
            self.latent_stride not in (2, 4, 8, 16, 32) or self.latent_stride > self.image_size // 4
        ):
            raise ValueError(
                f"latent_stride: a power of two from 2 to 32 and at most image_size / 4 is needed, "
                f"got {self.latent_stride}"
            )
        return self


class AugmentSection(_Section):
    hflip: bool = Field(False, description="Random horizontal flips (only if a mirrored part is still a good part).")
    vflip: bool = Field(False, description="Random vertical flips (same caveat as hflip).")
    shift: int = Field(2, ge=0, le=32, description="Random shift of up to this many pixels (edge pixels repeated).")
    rotation: float = Field(
        0.0, ge=0.0, le=45.0, description="Random rotation of up to +/- this many degrees about the centre."
    )
    brightness: float = Field(0.05, ge=0.0, le=0.5, description="Random brightness change of up to +/- this fraction.")
    contrast: float = Field(
        0.0, ge=0.0, le=0.5, description="Random contrast change of up to +/- this fraction (about mid-grey)."
    )


class TilingSection(_Section):
    """How an image (a camera frame) reaches the model: the one definition the trainer and the edge share."""

    mode: Literal["resize", "tiles"] = Field(
        "resize",
        description="resize = the image (its ROI) is resized to image_size x image_size; tiles = one "
        "image pixel is one model pixel: training takes random image_size crops, evaluation and the edge cut the "
        "ROI into image_size tiles and stitch their heatmaps (the larger value where tiles overlap).",
    )
    overlap: int = Field(
        16,
        ge=0,
        description="tiles: pixels shared by neighbouring tiles (the last tile of a row "
        "or column is flush with the ROI's edge).",
    )
    roi: RoiConfig | None = Field(
        None,
        description="Region of every image to inspect (the station's "
        "inspection.roi, in frame pixels); null = the whole image.",
    )
    train_crop: int | None = Field(
        None,
        description="tiles with latent: spatial: side of the random training crops when smaller than the "
        "model.image_size tiles the station scores (power of two, at least 32; a larger one means the tile); "
        "null = model.image_size. "
        "Small crops show the segmentation head as many painted defects per step as small tiles would, "
        "while the fully convolutional model scores fewer, larger tiles (less overlap, faster at the edge).",
    )


class DataSection(_Section):
    holdout: float = Field(
        0.15,
        gt=0.0,
        lt=0.9,
        description="Share of the normal training images held out (never trained on) for calibration.",
    )
    augment: AugmentSection = Field(default_factory=AugmentSection, description="Training-time augmentation.")


class TrainSection(_Section):
    steps: int = Field(
        1000,
        ge=1,
        description="Optimisation steps of the GAN (one batch each for D and for "
        "E+G, or G for AnoGAN); AnoGAN's encoder steps come after (anogan.encoder_steps).",
    )
    batch_size: int = Field(16, ge=2, le=1024, description="Images per step.")
    lr: float = Field(5e-4, gt=0.0, description="Adam learning rate for E and G.")
    lr_d: float = Field(5e-4, gt=0.0, description="Adam learning rate for D.")
    beta1: float = Field(0.5, ge=0.0, lt=1.0, description="Adam beta1 (0.5 as in DCGAN/BiGAN).")
    recon_weight: float = Field(
        100.0,
        ge=0.0,
        description="Efficient GAN: weight of an explicit L1 term |x - G(E(x))| in the E+G loss; 0 = pure BiGAN "
        "losses. AnoGAN ignores it (its G never sees real images).",
    )
    seed: int = Field(0, description="Seed for torch, numpy and python; also chooses the held-out images.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available, else CPU.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; null = torch's default.")
    checkpoint_every: int = Field(500, ge=1, description="Write out/checkpoints/last.pt every this many steps.")
    log_every: int = Field(25, ge=1, description="Append losses to out/losses.csv every this many steps.")
    ema_decay: float = Field(
        0.999,
        ge=0.0,
        lt=1.0,
        description="Exponential moving average of the weights, used for scoring, calibration and export "
        "(the reference implementation scores with 0.999); 0 = score with the last weights.",
    )
    validate_every: int = Field(
        0,
        ge=0,
        description="Every this many steps, the mean residual of the held-out normals (validation "
        "loss, written to losses.csv); 0 = never. Only normal data: the test set is never looked at.",
    )
    keep: Literal["last", "best"] = Field(
        "last",
        description="Weights to keep: last = at the final step; best = at the lowest validation loss "
        "(needs validate_every > 0).",
    )
    early_stop_patience: int | None = Field(
        None,
        ge=1,
        description="Stop after this many validations without improvement; null = never (needs validate_every > 0).",
    )
    adversarial_weight: float = Field(
        1.0,
        ge=0.0,
        description="Efficient GAN: weight of the BiGAN losses in the E+G loss; 0 = no adversarial "
        "game (D is not trained, L_D is then meaningless).",
    )
    segmentation_weight: float = Field(1.0, ge=0.0, description="Weight of the segmentation head's focal loss.")
    grad_clip: float | None = Field(
        None,
        gt=0.0,
        description="Clip the gradient norm of the E+G (+ head) update at this value; null = never. "
        "Against the rare loss spikes a bad batch can set off.",
    )


class PseudoDefectSection(_Section):
    enabled: bool = Field(
        False,
        description="Paint synthetic defects on training images: E and G learn to restore "
        "the clean image, the segmentation head (model.segmentation_head) learns to mark them.",
    )
    probability: float = Field(0.5, gt=0.0, le=1.0, description="Share of the training images that get a defect.")
    kinds: list[Literal["perlin", "cutpaste", "scratch"]] = Field(
        ["perlin", "cutpaste", "scratch"],
        min_length=1,
        description="perlin = Perlin-noise blobs filled with grey, noise or another image's texture; cutpaste = a "
        "patch of the image moved elsewhere; scratch = thin lines and cracks.",
    )


class AnoGANSection(_Section):
    encoder_steps: int = Field(
        1000,
        ge=0,
        description="Steps of encoder training after the GAN (G and D frozen; izi_f loss); "
        "the one-pass scoring and the export use this encoder.",
    )
    encoder_lr: float = Field(1e-3, gt=0.0, description="Adam learning rate for the encoder.")
    encoder_kappa: float = Field(
        1.0,
        ge=0.0,
        description="Weight of D's feature distance in the encoder loss "
        "mean |x - G(E(x))| + kappa * mean |f(x) - f(G(E(x)))|.",
    )
    search_steps: int = Field(500, ge=1, description="Gradient steps on z per image for latent-search scoring.")
    search_lr: float = Field(0.05, gt=0.0, description="Adam learning rate on z in the latent search.")


class OCNNSection(_Section):
    enabled: bool = Field(
        False,
        description="Train a one-class network (OC-NN, seed 004) on the encoder's frozen "
        "latent codes after training; eval reports its score beside the GAN's.",
    )
    nu: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Share of training codes allowed outside the boundary; "
        "r is set to the nu-quantile of the outputs after each update.",
    )
    hidden: int = Field(32, ge=1, le=4096, description="Hidden units of the OC-NN.")
    steps: int = Field(1000, ge=1, description="Full-batch Adam updates of the OC-NN.")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate of the OC-NN.")


class CalibrationSection(_Section):
    nu: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="Tolerated false-alarm rate: threshold = (1 - nu) quantile of held-out normal scores.",
    )
    heatmap_quantile: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Quantile of all held-out normal smoothed residual pixels that maps to heatmap 1.0 (1.0 = max).",
    )
    batch_size: int = Field(64, ge=1, description="Images per batch when scoring.")
    threshold: Literal["normal_quantile", "pseudo_defects", "f1_optimal"] = Field(
        "normal_quantile",
        description="normal_quantile = the (1 - nu) quantile of held-out normal scores; "
        "pseudo_defects = the F1-maximising cut between the held-out normals and the same normals with one "
        "pseudo-defect painted on each (pseudo_defects.kinds, at the training crop's scale); "
        "f1_optimal = the F1-maximising cut between held-out normals and the labelled anomalies in `anomalies`.",
    )
    anomalies: Path | None = Field(
        None, description="Folder of labelled anomalous images for threshold: f1_optimal (never the test set)."
    )
    per_pixel: bool = Field(
        False,
        description="Aligned parts (tiling.mode resize): the map becomes (map - mean) / spread per pixel, both "
        "from the held-out normals and stored in the graph, so that rims and edges that are always there stop "
        "deciding the peak; the threshold comes from leave-one-out maps. Needs a peak score (residual_reduction: "
        "peak, or scoring: segmentation).",
    )

    @model_validator(mode="after")
    def _f1_needs_anomalies(self) -> CalibrationSection:
        if self.threshold == "f1_optimal" and self.anomalies is None:
            raise ValueError("threshold: f1_optimal needs calibration.anomalies, a folder of anomalous images")
        return self


class TrainConfig(_Section):
    """The whole training config; `model.kind` chooses the model family."""

    model: ModelSection = Field(default_factory=ModelSection, description="Network and score settings.")
    data: DataSection = Field(default_factory=DataSection, description="Held-out split and augmentation.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation settings.")
    anogan: AnoGANSection = Field(
        default_factory=AnoGANSection, description="AnoGAN only: encoder training and latent search."
    )
    ocnn: OCNNSection = Field(default_factory=OCNNSection, description="Optional OC-NN head on the latent codes.")
    calibration: CalibrationSection = Field(
        default_factory=CalibrationSection, description="Threshold and heatmap scale from held-out normals."
    )
    tiling: TilingSection = Field(
        default_factory=TilingSection,
        description="How images reach the model (resize or native-pixel tiles), and the ROI.",
    )
    pseudo_defects: PseudoDefectSection = Field(
        default_factory=PseudoDefectSection, description="Synthetic defects painted on training images."
    )

    @model_validator(mode="after")
    def _validation_needed(self) -> TrainConfig:
        t = self.train
        if t.validate_every == 0 and (t.keep == "best" or t.early_stop_patience is not None):
            raise ValueError("train.keep: best and train.early_stop_patience need train.validate_every > 0")
        if self.model.segmentation_head and not self.pseudo_defects.enabled:
            raise ValueError("model.segmentation_head learns from painted defects: set pseudo_defects.enabled: true")
        if self.calibration.per_pixel and self.tiling.mode == "tiles":
            raise ValueError(
                "calibration.per_pixel is for aligned parts scored whole (tiling.mode: resize); a tile "
                "lands on other places of each image"
            )
        if self.calibration.per_pixel and self.model.scoring == "residual" and self.model.residual_reduction != "peak":
            raise ValueError(
                "calibration.per_pixel needs a peak score: model.residual_reduction: peak or "
                "model.scoring: segmentation"
            )
        if (
            self.model.kind == "efficient_gan"
            and self.train.adversarial_weight == 0
            and self.model.scoring == "residual"
            and self.model.lambda_ > 0
        ):
            raise ValueError(
                "train.adversarial_weight: 0 leaves D untrained, and model.lambda > 0 would put its "
                "meaningless L_D into the score: set model.lambda: 0"
            )
        crop = self.tiling.train_crop
        if crop is not None and not (
            self.tiling.mode == "tiles" and self.model.latent == "spatial" and crop >= 32 and crop & (crop - 1) == 0
        ):
            raise ValueError(
                f"tiling.train_crop {crop} needs tiling.mode: tiles, model.latent: spatial (a fully "
                "convolutional model) and a power of two of at least 32; tiling.train_crop: null trains on "
                "whole tiles"
            )
        if self.tiling.mode == "tiles" and self.tiling.overlap >= self.model.image_size:
            raise ValueError(
                f"tiling.overlap {self.tiling.overlap} must be smaller than the "
                f"{self.model.image_size} px tiles (model.image_size)"
            )
        return self

    @property
    def crop_side(self) -> int:
        """Side of the training crops: `tiling.train_crop`, never larger than the tile (`model.image_size`)."""
        return min(self.tiling.train_crop or self.model.image_size, self.model.image_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict with the file's key names (`lambda`, not `lambda_`)."""
        return self.model_dump(mode="json", by_alias=True)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. train.steps=200")
    key, value_text = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"--set {override!r}: empty key")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {value_text!r} is not valid YAML: {exc}") from exc
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _error_summary(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(parts)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_error_summary(exc, source)) from exc


MIN_TILE = 32  # the smallest model.image_size


def fit_tiles_to_images(config: TrainConfig, smallest_side: int) -> TrainConfig:
    """`config` with tiles no larger than the smallest image side (tiling mode tiles), else `config` itself.

    In tile mode `model.image_size` is the largest tile: images smaller than it would be
    padded to it, and crops of a padded image would train mostly on the padding (on the
    128-px washers in 256-px tiles, image AUROC fell from 1.00 to 0.82). The tile becomes
    the largest power of two that fits (at least 32), and the training crops no larger.
    """
    size = config.model.image_size
    if config.tiling.mode != "tiles" or smallest_side >= size:
        return config
    tile = max(MIN_TILE, 1 << (smallest_side.bit_length() - 1))  # the largest power of two <= smallest_side
    raw = config.to_dict()
    raw["model"]["image_size"] = tile
    if config.tiling.train_crop is not None:
        raw["tiling"]["train_crop"] = min(config.tiling.train_crop, tile)  # as trained, in the run's config
    return config_from_dict(raw, source=f"model.image_size {size} fitted to images of {smallest_side} px")


def load_train_config(path: Path, overrides: list[str]) -> TrainConfig:
    """Read a YAML config, apply `key.path=value` overrides (values parsed as YAML), validate."""
    path = Path(path)
    raw, _ = read_yaml_file(path, "training config")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, train, calibration)")
    for override in overrides:
        _apply_override(raw, override)
    return config_from_dict(raw, source=str(path))
