"""Training loop for Efficient GAN and AnoGAN, with EMA weights, checkpoints, resume and calibration.

Run folder layout (`out/`):

    config.yaml            the resolved config (file + overrides)
    run.json               data source, image counts, the held-out image names, warnings
    losses.csv             step, phase, losses, validation loss (when measured), seconds
    checkpoints/last.pt    scoring weights (`model`), live weights, optimisers, step, RNG state
    checkpoints/best.pt    scoring weights at the lowest validation loss (train.keep: best)
    calibration.json       threshold (and how it was chosen), nu, n_images, heatmap_scale

The checkpoint holds only tensors, dicts, lists, strings and numbers, so it loads with
`torch.load(..., weights_only=True)`. Its `model` entry is always the *scoring* model:
the exponential moving average (EMA) of the weights when `train.ema_decay` > 0, the
live weights otherwise; `live` holds what the optimisers work on, for `--resume`.

What one step does lives beside each model, in its recipe (`model.recipe(config, device)`:
optimisers, phases, losses): `EfficientGANRecipe` (BiGAN losses, reconstruction, and
pseudo-defect restoration and segmentation) and `AnoGANRecipe` (DCGAN, then the izi_f
encoder with G and D frozen at their EMA weights). This loop only feeds batches, keeps
the EMA, validates, checkpoints and calibrates.

Only normal images are used here: validation (checkpoint selection, early stopping)
and calibration use the held-out slice of the training normals; the test set is read by
`ganspect eval` alone.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import pickle
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ganspect.edge.common import first_line
from ganspect.edge.errors import ConfigError, GanspectError
from ganspect.train.calibrate import calibrate, pseudo_defect_copies, threshold_anomalies
from ganspect.train.config import MIN_TILE, AugmentSection, TrainConfig, config_from_dict, fit_tiles_to_images
from ganspect.train.models.anogan import AnoGAN, AnoGANConfig, build_anogan, load_anogan
from ganspect.train.models.common import ScoringModel
from ganspect.train.models.efficient_gan import EfficientGANConfig, build_model, load_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ganspect-checkpoint/1"
CHECKPOINT = Path("checkpoints") / "last.pt"
BEST_CHECKPOINT = Path("checkpoints") / "best.pt"
# With fewer normal training images than this the GAN mostly memorises them; we say so.
MIN_TRAIN_IMAGES = 30
# Images needed per training run at each size before we stop warning: the networks gain
# a stride-2 stage (and about four times the parameters in its widest layers) per doubling,
# while a factory's few hundred good parts stay a few hundred.
MIN_IMAGES_FOR_SIZE = {32: 30, 64: 30, 128: 60, 256: 120}
LOSS_COLUMNS = ("loss_d", "loss_g", "loss_recon", "loss_feature", "loss_seg")


def model_config_from(config: TrainConfig) -> EfficientGANConfig | AnoGANConfig:
    m = config.model
    sigma = m.heatmap_sigma if m.heatmap_sigma is not None else m.image_size / 32
    common: dict[str, Any] = dict(
        image_size=m.image_size,
        channels=m.channels,
        latent_dim=m.latent_dim,
        base_width=m.base_width,
        lambda_=m.lambda_,
        residual_reduction=m.residual_reduction,
        residual_polarity=m.residual_polarity,
        heatmap_sigma=sigma,
        heatmap_spread=m.heatmap_spread,
        spectral_norm=m.spectral_norm,
        norm=m.norm,
        pixel_calibration=config.calibration.per_pixel,
        latent=m.latent,
        latent_stride=m.latent_stride,
        segmentation_head=m.segmentation_head,
        head_width=m.head_width,
        scoring=m.scoring,
    )
    if m.kind == "anogan":
        return AnoGANConfig(**common)
    return EfficientGANConfig(**common, discrimination=m.discrimination, d_dropout=m.d_dropout)


def build_for(config: TrainConfig) -> ScoringModel:
    cfg = model_config_from(config)
    return build_anogan(cfg) if isinstance(cfg, AnoGANConfig) else build_model(cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise GanspectError("train.device is cuda but no CUDA device is available; use auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def to_model_input(images_uint8_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], the same as the models' normalise."""
    return ScoringModel.normalise(torch.from_numpy(images_uint8_nhwc))


def progress_bar(total: int, initial: int = 0, desc: str = "train", unit: str = "step") -> Any:
    """A tqdm bar that redraws often on a terminal and rarely (every 30 s) into a log file."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        dynamic_ncols=tty,
        mininterval=0.5 if tty else 30.0,
        maxinterval=60.0 if tty else 600.0,
    )


def augment(x: torch.Tensor, cfg: AugmentSection) -> torch.Tensor:
    """Random flips, shift/rotation (border replicated), brightness and contrast on (N, C, H, W) in [-1, 1]."""
    n = x.shape[0]
    if cfg.hflip:
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if cfg.vflip:
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)
    if cfg.shift or cfg.rotation:
        h, w = x.shape[2:]
        angle = (torch.rand(n, device=x.device) * 2 - 1) * math.radians(cfg.rotation)
        # affine_grid works in [-1, 1] coordinates: a shift of s pixels is 2 s / side.
        shift = (torch.rand(n, 2, device=x.device) * 2 - 1) * cfg.shift
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos, -sin, shift[:, 0] * 2 / w], dim=1),
                torch.stack([sin, cos, shift[:, 1] * 2 / h], dim=1),
            ],
            dim=1,
        )  # (N, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.brightness:
        gain = 1.0 + (torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1) * cfg.brightness
        x = ((x + 1.0) * gain - 1.0).clamp(-1.0, 1.0)
    if cfg.contrast:
        factor = 1.0 + (torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1) * cfg.contrast
        x = (x * factor).clamp(-1.0, 1.0)  # 0 is mid-grey in [-1, 1]
    return x


def refresh_batchnorm(model: ScoringModel, x: torch.Tensor, batch_size: int = 64, seed: int = 0) -> None:
    """Re-estimate the BatchNorm running statistics of E and G on what they see at inference.

    Efficient GAN: while training, G also runs on prior samples z ~ N(0, I) for the
    adversarial game, so its running statistics mix two distributions; at inference G
    only ever sees E(x). AnoGAN: G's inference inputs are prior-like codes, E's are the
    training images. Running statistics accumulated under momentum also lag the EMA
    weights that score. Recomputing them ("precise BN") makes eval-mode outputs match the
    weights. A no-op for GroupNorm or no normalisation.
    """
    norms = [
        m for part in (model.encoder, model.generator) for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    if not norms:
        return
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches below
        m.train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            z = model.encoder(batch)
            if isinstance(model, AnoGAN):
                z = torch.randn(z.shape, generator=gen).to(z.device)  # AnoGAN's G is trained on the prior
            model.generator(z)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


class EMA(Generic[ModuleT]):
    """Exponential moving average of a model's parameters; buffers are copied as they are.

    The decay warms up as min(decay, (1 + t) / (10 + t)) (TensorFlow's num_updates rule),
    so that the average does not keep the random initial weights for thousands of steps.
    """

    def __init__(self, model: ModuleT, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module, part: str) -> None:
        """Copy the averaged weights of one sub-network (e.g. "generator") into `model`."""
        model.get_submodule(part).load_state_dict(self.model.get_submodule(part).state_dict())


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GanspectError(f"no checkpoint at {path}: train first, or check the run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text spans paragraphs and suggests weights_only=False, which would run the file's code.
        detail = next(
            (line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line),
            first_line(exc),
        )
        raise GanspectError(
            f"{path} is not a readable ganspect checkpoint: it holds Python objects besides "
            f"tensors ({detail}), and loading those could run code; use a checkpoint that "
            "ganspect train wrote"
        ) from exc
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise GanspectError(f"{path} is not a readable ganspect checkpoint: {first_line(exc)}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise GanspectError(f"{path} is not a ganspect checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> ScoringModel:
    """The scoring model of a checkpoint dict, whichever kind it holds."""
    kind = ckpt.get("kind", "efficient_gan")
    if kind == "anogan":
        return load_anogan(ckpt)
    if kind == "efficient_gan":
        return load_model(ckpt)
    raise GanspectError(f"checkpoint holds an unknown model kind {kind!r}")


def load_run_model(run: Path) -> tuple[ScoringModel, dict[str, Any]]:
    """The trained (and, if training finished, calibrated) scoring model of a run folder, in eval mode.

    For either kind it is a module whose `forward(uint8 NHWC)` returns (score, heatmap)
    in one pass: Efficient GAN's E -> G -> D, or AnoGAN's encoder -> G -> D.
    """
    ckpt = load_checkpoint(Path(run) / CHECKPOINT)
    model = model_from_checkpoint(ckpt)
    model.eval()
    return model, ckpt


class _Trainer:
    """Holds the model, its EMA, the optimisers and the step counter of one run."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.kind = config.model.kind
        self.model = build_for(config).to(device)
        # How this kind of model learns (optimisers, phases, losses) lives beside the model.
        self.recipe = self.model.recipe(config, device)
        self.optimisers = self.recipe.optimisers
        t = config.train
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.step = 0
        self.calibrated = False
        self.best_val = math.inf
        self.best_step = -1
        self.bad_validations = 0
        self.stopped_early = False

    @property
    def total_steps(self) -> int:
        return self.recipe.total_steps

    def phase(self) -> str:
        return self.recipe.phase(self.step)

    @property
    def scoring_model(self) -> ScoringModel:
        return self.ema.model if self.ema is not None else self.model

    def state(self, data_info: dict[str, Any]) -> dict[str, Any]:
        state = {
            "format": CHECKPOINT_FORMAT,
            "kind": self.kind,
            "model_config": self.model.cfg.to_dict(),
            "train_config": self.config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.scoring_model.state_dict().items()},
            "live": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "step": self.step,
            "rng": torch.get_rng_state(),
            "calibrated": self.calibrated,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "bad_validations": self.bad_validations,
            "stopped_early": self.stopped_early,
            "data": data_info,
        }
        state.update({name: opt.state_dict() for name, opt in self.optimisers.items()})
        return state

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt.get("live", ckpt["model"]))
        if self.ema is not None:
            self.ema.model.load_state_dict(ckpt["model"])
            self.ema.updates = int(ckpt.get("ema_updates", ckpt["step"]))
        for name, opt in self.optimisers.items():
            opt.load_state_dict(ckpt[name])
        self.step = int(ckpt["step"])
        self.best_val = float(ckpt.get("best_val", math.inf))
        self.best_step = int(ckpt.get("best_step", -1))
        self.bad_validations = int(ckpt.get("bad_validations", 0))
        self.stopped_early = bool(ckpt.get("stopped_early", False))
        torch.set_rng_state(ckpt["rng"])

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a (N, C, H, W) batch in [-1, 1]; then the EMA follows."""
        self.recipe.before_step(self.step, self.ema)
        losses = self.recipe.step(x, self.step)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model)
        return losses

    def validation_loss(self, x_train: torch.Tensor, x_val: torch.Tensor, batch_size: int) -> float:
        """Mean absolute residual of the held-out normals under the scoring weights (fresh BatchNorm stats)."""
        probe = copy.deepcopy(self.scoring_model)
        refresh_batchnorm(probe, x_train[:512], batch_size=batch_size, seed=self.config.train.seed)
        probe.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(x_val), batch_size):
                xb = x_val[start : start + batch_size]
                total += float((xb - probe.score_parts(xb).recon).abs().mean(dim=(1, 2, 3)).sum())
        return total / max(1, len(x_val))


def _write_config(out: Path, config: TrainConfig) -> None:
    text = "# Resolved training config (file + --set overrides), written by ganspect train.\n"
    text += yaml.safe_dump(config.to_dict(), sort_keys=False)
    (out / "config.yaml").write_text(text, encoding="utf-8")


def read_run_config(run: Path) -> TrainConfig:
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise GanspectError(f"{run} has no config.yaml: is it a run folder written by `ganspect train`?")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, source=str(path))


def read_run_info(run: Path) -> dict[str, Any]:
    path = Path(run) / "run.json"
    if not path.is_file():
        raise GanspectError(f"{run} has no run.json: is it a run folder written by `ganspect train`?")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_resume_compatible(config: TrainConfig, ckpt: dict[str, Any]) -> None:
    saved = config_from_dict(ckpt["train_config"], source="checkpoint")
    if saved.model != config.model:
        raise GanspectError(
            "--resume: the model section differs from the checkpoint's; "
            "use the run's config.yaml (only train.* settings may change)"
        )
    if saved.data.holdout != config.data.holdout or saved.train.seed != config.train.seed:
        raise GanspectError(
            "--resume: data.holdout and train.seed must stay as in the checkpoint (they choose the held-out images)"
        )
    if (
        saved.model.kind == "anogan"
        and saved.train.steps != config.train.steps
        and int(ckpt["step"]) > min(saved.train.steps, config.train.steps)
    ):
        raise GanspectError("--resume: AnoGAN's encoder phase has begun; train.steps (the GAN's) can no longer change")
    if (saved.train.ema_decay > 0) != (config.train.ema_decay > 0):
        raise GanspectError("--resume: train.ema_decay cannot be switched on or off in a running run")


def latent_codes(
    model: ScoringModel, images: np.ndarray, batch_size: int = 256, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """z = E(x) (N, latent) of uint8 (N, H, W, C) images, in eval mode, detached, on the CPU."""
    model.eval()
    codes = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_model_input(images[start : start + batch_size]).to(device)
            codes.append(model.encoder(x).cpu())
    return torch.cat(codes)


def _fit_ocnn_head(
    config: TrainConfig, model: ScoringModel, train_images: np.ndarray, ckpt_path: Path
) -> dict[str, Any]:
    """Fit the OC-NN on the frozen training codes and store it in the checkpoint under `ocnn`."""
    from ganspect.train.models.ocnn import fit_ocnn

    o = config.ocnn
    device = next(model.parameters()).device
    fit = fit_ocnn(
        latent_codes(model, train_images, device=device),
        nu=o.nu,
        hidden=o.hidden,
        steps=o.steps,
        lr=o.lr,
        seed=config.train.seed,
    )
    ckpt = load_checkpoint(ckpt_path)
    ckpt["ocnn"] = {
        "state": {k: v.detach().cpu() for k, v in fit.model.state_dict().items()},
        "in_dim": int(fit.model.V.in_features),
        "hidden": o.hidden,
        "nu": o.nu,
    }
    save_checkpoint(ckpt_path, ckpt)
    log.info(
        "OC-NN head: r %.4f, %.1f %% of training codes outside (nu %.2f)", float(fit.model.r), 100 * fit.outside, o.nu
    )
    return {"nu": o.nu, "r": float(fit.model.r), "train_outside": fit.outside, "final_loss": fit.losses[-1]}


def load_ocnn_head(ckpt: dict[str, Any]) -> Any:
    """The OC-NN head stored in a checkpoint, or None."""
    from ganspect.train.models.ocnn import OCNN

    head = ckpt.get("ocnn")
    if not head:
        return None
    model = OCNN(int(head["in_dim"]), int(head["hidden"]), float(head["nu"]))
    model.load_state_dict(head["state"])
    return model.eval()


def _sigterm_as_interrupt() -> Any:
    """Treat SIGTERM (kill, systemd, a batch scheduler) like Ctrl-C: save a checkpoint, then stop.

    Returns the function that puts the previous handler back. Signal handlers can only be
    set from the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def data_warnings(n_train: int, n_val: int, image_size: int, nu: float, threshold: str) -> list[str]:
    """What is worth telling the user about the amount of data, one sentence each."""
    warnings = []
    need = MIN_IMAGES_FOR_SIZE.get(image_size, MIN_TRAIN_IMAGES)
    if n_train < need:
        warnings.append(
            f"only {n_train} normal training images at {image_size}x{image_size} (at least {need} advised): "
            "expect the GAN to memorise them; turn on augmentation (data.augment) or use a smaller model.image_size"
        )
    if threshold == "normal_quantile" and n_val * nu < 1:
        warnings.append(
            f"{n_val} held-out normals x nu {nu:g} = {n_val * nu:.2g} < 1: the (1 - nu) quantile lies above all "
            f"but {n_val * nu:.2g} held-out scores, so the threshold is (nearly) their maximum and the real false-"
            f"alarm rate is not measured; hold out at least {math.ceil(1 / nu) if nu > 0 else 'more'} normals "
            "(data.holdout) or raise calibration.nu"
        )
    return warnings


def train(config: TrainConfig, data: Path, out: Path, resume: bool = False) -> Path:
    """Train on the normal images under `data`, calibrate on a held-out slice; return the run folder."""
    from ganspect.train.data import Framing, labelled_anomalies, load_normal_images, split_holdout

    m = config.model
    if config.tiling.mode == "tiles":
        # Native pixels first (padded only below the smallest tile), then tiles that fit them.
        images = load_normal_images(data, m.image_size, m.channels, Framing.of(MIN_TILE, config.tiling))
        smallest = min(min(image.shape[:2]) for image in images.images)
        fitted = fit_tiles_to_images(config, smallest)
        if fitted is not config:
            log.info(
                "the smallest training image is %d px: tiles of %d px instead of model.image_size %d",
                smallest,
                fitted.model.image_size,
                m.image_size,
            )
        config = fitted
    else:
        images = load_normal_images(data, m.image_size, m.channels, Framing.of(m.image_size, config.tiling))
    train_set, holdout_set = split_holdout(images, config.data.holdout, config.train.seed)
    if len(train_set.images) < 2 or len(holdout_set.images) < 1:
        raise GanspectError(
            f"{data}: {len(images.images)} normal images are too few to train and hold out; at least 10 are needed"
        )
    return train_arrays(
        config,
        train_set.images,
        holdout_set.images,
        out,
        resume=resume,
        source=str(Path(data).resolve()),
        holdout_names=list(holdout_set.names),
        anomaly_images=labelled_anomalies(config),
    )


class CropPool:
    """Random model-sized crops of native-size uint8 images (tiling mode tiles), as normalised batches.

    The images stay uint8 on the CPU (a thousand 640x640 boards are 400 MB, four times
    that as floats); each batch is cut, stacked and moved to the device.
    """

    def __init__(self, images: Any, size: int, seed: int) -> None:
        self.images = [torch.from_numpy(np.ascontiguousarray(image)) for image in images]
        self.size = size
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> torch.Tensor:
        """n crops (n, H, W, C) uint8, each from a random image at a random place."""
        picks = torch.randint(0, len(self.images), (n,), generator=self.gen).tolist()
        crops = []
        for i in picks:
            image = self.images[i]
            y = int(torch.randint(0, image.shape[0] - self.size + 1, (1,), generator=self.gen))
            x = int(torch.randint(0, image.shape[1] - self.size + 1, (1,), generator=self.gen))
            crops.append(image[y : y + self.size, x : x + self.size])
        return torch.stack(crops)


def _check_run_folder(out: Path, resume: bool) -> Path:
    """The run's checkpoint path, once `out` is known to be a new run or (with resume) an existing one."""
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise GanspectError(f"--resume: {ckpt_path} does not exist")
    if not resume and ckpt_path.exists():
        raise GanspectError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return ckpt_path


def _write_run_info(out: Path, data_info: dict[str, Any], extra: dict[str, Any]) -> None:
    (out / "run.json").write_text(json.dumps({**data_info, **extra}, indent=2) + "\n", encoding="utf-8")


class _TrainingTensors:
    """What the loop trains and validates on, on the device.

    Whole images are one tensor each (small data sets fit in memory). In tiling mode tiles,
    batches are random crops of the native-size images, and fixed tile-sized crops stand
    for the data where whole images did: BatchNorm statistics and validation.
    """

    def __init__(self, config: TrainConfig, train_images: Any, holdout_images: Any, device: torch.device) -> None:
        size, seed = config.model.image_size, config.train.seed
        self.device = device
        self.pool: CropPool | None = None
        if config.tiling.mode == "tiles":
            self.pool = CropPool(train_images, config.crop_side, seed)
            self.x_all = to_model_input(CropPool(train_images, size, seed + 2).sample(512).numpy()).to(device)
            self.x_val = to_model_input(CropPool(holdout_images, size, seed + 3).sample(256).numpy()).to(device)
        else:
            self.x_all = to_model_input(train_images).to(device)  # (N, C, H, W)
            self.x_val = to_model_input(holdout_images).to(device)

    def batch(self, n: int) -> torch.Tensor:
        if self.pool is not None:
            return to_model_input(self.pool.sample(n).numpy()).to(self.device)
        picks = torch.randint(0, len(self.x_all), (min(n, len(self.x_all)),), device=self.device)
        return self.x_all[picks]


def _validate(
    trainer: _Trainer, config: TrainConfig, data: _TrainingTensors, best_path: Path, data_info: dict[str, Any]
) -> float | None:
    """The validation loss when this step validates (else None); keeps the best weights, decides early stop."""
    t = config.train
    if not (t.validate_every and trainer.step % t.validate_every == 0 and trainer.recipe.validates(trainer.step)):
        return None
    val = trainer.validation_loss(data.x_all, data.x_val, config.calibration.batch_size)
    if val < trainer.best_val:
        trainer.best_val, trainer.best_step, trainer.bad_validations = val, trainer.step, 0
        save_checkpoint(best_path, trainer.state(data_info))
        return val
    trainer.bad_validations += 1
    if t.early_stop_patience and trainer.bad_validations >= t.early_stop_patience:
        trainer.stopped_early = True
        log.info("early stop at step %d: no better validation loss since step %d", trainer.step, trainer.best_step)
    return val


def _loss_row(step: int, phase: str, losses: dict[str, float], val: float | None, seconds: float) -> list[Any]:
    return [
        step,
        phase,
        *(f"{losses[k]:.5f}" if k in losses else "" for k in LOSS_COLUMNS),
        "" if val is None else f"{val:.5f}",
        f"{seconds:.1f}",
    ]


def _run_steps(
    trainer: _Trainer, config: TrainConfig, data: _TrainingTensors, out: Path, data_info: dict[str, Any], resume: bool
) -> None:
    """Train until the last step or an early stop, logging losses.csv and saving checkpoints on the way.

    Ctrl-C and SIGTERM save a checkpoint before they stop the run, so --resume goes on from there.
    """
    t = config.train
    ckpt_path, best_path, losses_path = out / CHECKPOINT, out / BEST_CHECKPOINT, out / "losses.csv"
    new_file = not losses_path.exists() or not resume
    started = time.monotonic()
    total = trainer.total_steps
    bar = progress_bar(total, initial=min(trainer.step, total), desc=f"train {config.model.kind}")
    restore_sigterm = _sigterm_as_interrupt()
    try:
        with open(losses_path, "w" if new_file else "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(["step", "phase", *LOSS_COLUMNS, "val_loss", "seconds"])
            trainer.model.train()
            while trainer.step < total and not trainer.stopped_early:
                phase = trainer.phase()
                losses = trainer.train_step(augment(data.batch(t.batch_size), config.data.augment))
                bar.update(1)
                val = _validate(trainer, config, data, best_path, data_info)
                if trainer.step % t.log_every == 0 or trainer.step == total or val is not None:
                    bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
                    writer.writerow(_loss_row(trainer.step, phase, losses, val, time.monotonic() - started))
                    f.flush()
                if trainer.step % t.checkpoint_every == 0:
                    save_checkpoint(ckpt_path, trainer.state(data_info))
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(ckpt_path, trainer.state(data_info))
        log.warning("interrupted at step %d; checkpoint saved, continue with --resume", trainer.step)
        raise
    finally:
        restore_sigterm()
    bar.close()


def _log_calibration(cal: Any) -> None:
    """What the per-pixel calibration and the threshold's confidence say about the data."""
    if cal.per_pixel is not None:
        pp = cal.per_pixel
        log.info(
            "per-pixel calibration: %.0f %% of the held-out normals' peaks sat on the hottest %.0f %% of pixels "
            "before, %.0f %% after",
            100 * pp["peaks_on_hot_pixels_before"],
            100 * pp["hot_share"],
            100 * pp["peaks_on_hot_pixels_after"],
        )
        if not pp["helps"]:
            log.warning(
                "per-pixel calibration does not help here: the normals' peaks do not sit on fixed places "
                "(rims, edges) that it could remove; the parts are not aligned enough, or have none. "
                "Consider calibration.per_pixel: false"
            )
    if cal.confidence is not None:
        c = cal.confidence
        log.info(
            "threshold confidence: %d of %d held-out normals above it; real false-alarm rate below %.1f %% "
            "(95 %% bound); other normals would move it within %.5g .. %.5g",
            c["held_out_above"],
            cal.n_images,
            100 * c["false_alarm_rate_upper_95"],
            c["threshold_p05"],
            c["threshold_p95"],
        )
        if c["false_alarm_rate_upper_95"] > 3 * max(cal.nu, 1e-9):
            log.warning(
                "%d held-out normals cannot show a false-alarm rate of %.1f %%: the data can promise only "
                "%.1f %%; hold out more normals (data.holdout) for a threshold you can defend",
                cal.n_images,
                100 * cal.nu,
                100 * c["false_alarm_rate_upper_95"],
            )


def _calibrate_kept_weights(
    trainer: _Trainer, config: TrainConfig, data: _TrainingTensors, out: Path, holdout_images: Any, anomaly_images: Any
) -> tuple[Any, int]:
    """Calibrate the weights kept (the best validated ones with train.keep: best); return the result and their step."""
    t = config.train
    best_path = out / BEST_CHECKPOINT
    scoring = trainer.scoring_model
    keep_best = t.keep == "best" and best_path.is_file()
    if keep_best:
        best = load_checkpoint(best_path)
        scoring.load_state_dict(best["model"])
        log.info("keeping the weights of step %d (lowest validation loss %.5f)", trainer.best_step, trainer.best_val)
    refresh_batchnorm(scoring, data.x_all, batch_size=config.calibration.batch_size, seed=t.seed)
    if config.calibration.threshold == "pseudo_defects":
        anomaly_images = pseudo_defect_copies(holdout_images, config)
    cal = calibrate(
        scoring,
        holdout_images,
        config.calibration,
        device=data.device,
        anomaly_images=anomaly_images,
        tiles=config.tiling.mode == "tiles",
        overlap=config.tiling.overlap,
    )
    return cal, trainer.best_step if keep_best else trainer.step


def recalibrate(run: Path, overrides: list[str]) -> Any:
    """Set a trained run's threshold and heatmap scale again from its held-out normals, with its
    calibration settings changed by `overrides`; return the calibration.

    Only calibration.* settings can change: what a line tolerates (nu) or how the threshold is
    chosen is its own decision and should not cost a training run. The checkpoint, config.yaml
    and calibration.json are rewritten; a bundle exported before keeps the old threshold.
    """
    from ganspect.train.config import load_train_config
    from ganspect.train.data import held_out_images

    run = Path(run)
    others = [o for o in overrides if not o.strip().startswith("calibration.")]
    if others:
        raise ConfigError(
            f"recalibration changes calibration.* settings only, not {', '.join(others)}: "
            "those change the model, so train again"
        )
    ckpt_path = run / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path)
    if not ckpt.get("calibrated"):
        raise GanspectError(f"{run} has not finished training: finish it first (ganspect train --resume)")
    config = load_train_config(run / "config.yaml", overrides)
    source = Path(read_run_info(run)["source"])
    held = held_out_images(config, source)
    if held is None:
        raise GanspectError(f"the run's training data {source} is gone: its held-out normals cannot be scored again")
    model = model_from_checkpoint(ckpt).eval()
    cal = calibrate(
        model,
        held,
        config.calibration,
        anomaly_images=threshold_anomalies(held, config, config.calibration.threshold),
        tiles=config.tiling.mode == "tiles",
        overlap=config.tiling.overlap,
    )
    ckpt["model"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt["train_config"] = config.to_dict()
    save_checkpoint(ckpt_path, ckpt)
    cal_path = run / "calibration.json"
    before = json.loads(cal_path.read_text(encoding="utf-8")) if cal_path.is_file() else {}
    kept = {k: before[k] for k in ("kept_step", "ocnn") if k in before}  # facts of the training, not of calibration
    cal_path.write_text(json.dumps({**cal.to_dict(), **kept}, indent=2) + "\n", encoding="utf-8")
    _write_config(run, config)
    log.info(
        "threshold %.5f (%s, nu %.3f on %d held-out normals; was %s), heatmap scale %.5f; export the run again",
        cal.threshold,
        cal.method,
        cal.nu,
        cal.n_images,
        f"{before['threshold']:.5f}" if "threshold" in before else "unknown",
        cal.heatmap_scale,
    )
    _log_calibration(cal)
    return cal


def train_arrays(
    config: TrainConfig,
    train_images: Any,
    holdout_images: Any,
    out: Path,
    resume: bool = False,
    source: str = "arrays",
    holdout_names: list[str] | None = None,
    anomaly_images: Any = None,
) -> Path:
    """Train on uint8 (N, H, W, C) normal images, calibrate on the held-out ones; return the run folder.

    In tiling mode tiles the images are native-size (a list when their sizes differ) and
    training takes random model-sized crops. `anomaly_images` (labelled anomalies, never
    test images) are needed only for calibration.threshold: f1_optimal. The benchmarks
    call this directly with MNIST arrays.
    """
    out = Path(out)
    ckpt_path = _check_run_folder(out, resume)
    t, m = config.train, config.model
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    seed_everything(t.seed)
    warnings = data_warnings(
        len(train_images), len(holdout_images), m.image_size, config.calibration.nu, config.calibration.threshold
    )
    for line in warnings:
        log.warning("%s", line)

    data_info = {"source": source, "n_train": len(train_images), "n_val": len(holdout_images)}
    trainer = _Trainer(config, device)
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_resume_compatible(config, ckpt)
        trainer.restore(ckpt)
        log.info("resuming %s at step %d", out, trainer.step)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, config)
    _write_run_info(
        out,
        data_info,
        {"kind": m.kind, "device": str(device), "warnings": warnings, "holdout_names": list(holdout_names or [])},
    )

    data = _TrainingTensors(config, train_images, holdout_images, device)
    _run_steps(trainer, config, data, out, data_info, resume)
    cal, kept_step = _calibrate_kept_weights(trainer, config, data, out, holdout_images, anomaly_images)
    trainer.calibrated = True
    save_checkpoint(ckpt_path, trainer.state(data_info))
    cal_dict = {**cal.to_dict(), "kept_step": kept_step}
    if config.ocnn.enabled:
        cal_dict["ocnn"] = _fit_ocnn_head(config, trainer.scoring_model, train_images, ckpt_path)
    (out / "calibration.json").write_text(json.dumps(cal_dict, indent=2) + "\n", encoding="utf-8")
    log.info(
        "trained %d steps; threshold %.5f (%s, nu %.3f on %d held-out normals), heatmap scale %.5f",
        trainer.step,
        cal.threshold,
        cal.method,
        cal.nu,
        cal.n_images,
        cal.heatmap_scale,
    )
    _log_calibration(cal)
    return out
