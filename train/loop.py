"""Training loop for Efficient GAN, with checkpoints, resume and calibration.

Run folder layout (`out/`):

    config.yaml            the resolved config (file + overrides)
    run.json               data source, image counts, the held-out image names
    losses.csv             step, loss_d, loss_eg, loss_recon, seconds
    checkpoints/last.pt    state dicts + config dicts + step + optimiser and RNG state
    calibration.json       threshold (normal_quantile), nu, n_images, heatmap_scale

The checkpoint holds only tensors, dicts, lists, strings and numbers, so it loads with
`torch.load(..., weights_only=True)`. BiGAN losses: D learns (x, E(x)) = real and
(G(z), z) = fake; E and G learn to fool it jointly (labels swapped), plus an optional
explicit L1 reconstruction term weighted by `train.recon_weight`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ganspect.edge.errors import GanspectError
from ganspect.train.calibrate import calibrate
from ganspect.train.config import AugmentSection, TrainConfig, config_from_dict
from ganspect.train.models.efficient_gan import EfficientGAN, EfficientGANConfig, build_model, load_model

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "ganspect-checkpoint/1"
CHECKPOINT = Path("checkpoints") / "last.pt"
# With fewer normal training images than this the GAN mostly memorises them; we say so.
MIN_TRAIN_IMAGES = 30


def model_config_from(config: TrainConfig) -> EfficientGANConfig:
    m = config.model
    sigma = m.heatmap_sigma if m.heatmap_sigma is not None else m.image_size / 32
    return EfficientGANConfig(
        image_size=m.image_size, channels=m.channels, latent_dim=m.latent_dim, base_width=m.base_width,
        lambda_=m.lambda_, discrimination=m.discrimination, residual_reduction=m.residual_reduction,
        heatmap_sigma=sigma,
        spectral_norm=m.spectral_norm, d_dropout=m.d_dropout, norm=m.norm,
    )


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
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], the same as EfficientGAN.normalise."""
    return EfficientGAN.normalise(torch.from_numpy(images_uint8_nhwc))


def augment(x: torch.Tensor, cfg: AugmentSection) -> torch.Tensor:
    """Random flips, shifts (border replicated) and brightness on a (N, C, H, W) batch in [-1, 1]."""
    n = x.shape[0]
    if cfg.hflip:
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if cfg.vflip:
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)
    if cfg.shift:
        s = cfg.shift
        h, w = x.shape[2:]
        padded = F.pad(x, (s, s, s, s), mode="replicate")  # (N, C, H+2s, W+2s)
        offsets = torch.randint(0, 2 * s + 1, (n, 2)).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    if cfg.brightness:
        gain = 1.0 + (torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1) * cfg.brightness
        x = ((x + 1.0) * gain - 1.0).clamp(-1.0, 1.0)
    return x


def refresh_generator_batchnorm(model: EfficientGAN, x: torch.Tensor, batch_size: int = 64) -> None:
    """Re-estimate G's BatchNorm running statistics on reconstructions G(E(x)) of training images.

    While training, G also runs on prior samples z ~ N(0, I) for the adversarial game, so
    its running statistics mix two distributions; at inference G only ever sees E(x).
    Recomputing them on E(x) alone ("precise BN") makes eval-mode reconstructions match
    what the reconstruction loss trained. A no-op for GroupNorm or no normalisation.
    """
    norms = [m for m in model.generator.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        return
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches below
        m.train()
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            model.generator(model.encoder(x[start:start + batch_size]))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


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
        detail = next((line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line),
                      str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise GanspectError(f"{path} is not a readable ganspect checkpoint: it holds Python objects besides "
                            f"tensors ({detail}), and loading those could run code; use a checkpoint that "
                            "ganspect train wrote") from exc
    except Exception as exc:  # torch raises several types for damaged or foreign files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GanspectError(f"{path} is not a readable ganspect checkpoint: {first_line}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise GanspectError(f"{path} is not a ganspect checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return ckpt


def load_run_model(run: Path) -> tuple[EfficientGAN, dict[str, Any]]:
    """The trained (and, if training finished, calibrated) model of a run folder, in eval mode."""
    ckpt = load_checkpoint(Path(run) / CHECKPOINT)
    model = load_model(ckpt)
    model.eval()
    return model, ckpt


class _Trainer:
    """Holds the model, optimisers and step counter of one run."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model = build_model(model_config_from(config)).to(device)
        t = config.train
        m = self.model
        self.opt_d = torch.optim.Adam(m.discriminator.parameters(), lr=t.lr_d, betas=(t.beta1, 0.999))
        self.opt_eg = torch.optim.Adam(
            list(m.encoder.parameters()) + list(m.generator.parameters()), lr=t.lr, betas=(t.beta1, 0.999))
        self.step = 0
        self.calibrated = False

    def state(self, data_info: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "efficient_gan",
            "model_config": self.model.cfg.to_dict(),
            "train_config": self.config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "opt_d": self.opt_d.state_dict(),
            "opt_eg": self.opt_eg.state_dict(),
            "step": self.step,
            "rng": torch.get_rng_state(),
            "calibrated": self.calibrated,
            "data": data_info,
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.opt_eg.load_state_dict(ckpt["opt_eg"])
        self.step = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"])

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One D update and one E+G update on a (N, C, H, W) batch in [-1, 1]."""
        m = self.model
        n = x.shape[0]
        ones = torch.ones(n, device=self.device)
        zeros = torch.zeros(n, device=self.device)
        z_prior = torch.randn(n, m.cfg.latent_dim, device=self.device)  # (N, latent)

        # D: real pairs (x, E(x)) vs fake pairs (G(z), z); E and G are held fixed.
        with torch.no_grad():
            z_enc = m.encoder(x)
            x_gen = m.generator(z_prior)
        logit_real, _ = m.discriminator(x, z_enc)
        logit_fake, _ = m.discriminator(x_gen, z_prior)
        loss_d = (F.binary_cross_entropy_with_logits(logit_real, ones)
                  + F.binary_cross_entropy_with_logits(logit_fake, zeros))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        # E and G together: swap the labels so that both try to fool D.
        z_enc = m.encoder(x)
        x_gen = m.generator(z_prior)
        logit_real, _ = m.discriminator(x, z_enc)
        logit_fake, _ = m.discriminator(x_gen, z_prior)
        loss_adv = (F.binary_cross_entropy_with_logits(logit_real, zeros)
                    + F.binary_cross_entropy_with_logits(logit_fake, ones))
        loss_recon = torch.zeros((), device=self.device)
        w = self.config.train.recon_weight
        if w > 0:
            loss_recon = (x - m.generator(z_enc)).abs().mean()
        loss_eg = loss_adv + w * loss_recon
        self.opt_eg.zero_grad(set_to_none=True)
        loss_eg.backward()
        self.opt_eg.step()
        self.step += 1
        return {"loss_d": loss_d.item(), "loss_eg": loss_adv.item(), "loss_recon": loss_recon.item()}


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
        raise GanspectError("--resume: the model section differs from the checkpoint's; "
                            "use the run's config.yaml (only train.* settings may change)")
    if saved.data.holdout != config.data.holdout or saved.train.seed != config.train.seed:
        raise GanspectError("--resume: data.holdout and train.seed must stay as in the checkpoint "
                            "(they choose the held-out images)")


def train(config: TrainConfig, data: Path, out: Path, resume: bool = False) -> Path:
    """Train on the normal images under `data`, calibrate on a held-out slice; return the run folder."""
    from tqdm import tqdm

    from ganspect.train.data import load_normal_images, split_holdout

    out = Path(out)
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise GanspectError(f"--resume: {ckpt_path} does not exist")
    if not resume and ckpt_path.exists():
        raise GanspectError(f"{out} already holds a run; pass --resume to continue it or choose another --out")

    t = config.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    seed_everything(t.seed)

    m = config.model
    images = load_normal_images(data, m.image_size, m.channels)
    train_set, holdout_set = split_holdout(images, config.data.holdout, t.seed)
    if len(train_set.images) < 2 or len(holdout_set.images) < 1:
        raise GanspectError(f"{data}: {len(images.images)} normal images are too few to train and hold out; "
                            "at least 10 are needed")
    if len(train_set.images) < MIN_TRAIN_IMAGES:
        log.warning("only %d normal training images at %dx%d: expect memorisation; augmentation helps",
                    len(train_set.images), m.image_size, m.image_size)

    data_info = {"source": str(Path(data).resolve()), "n_train": len(train_set.images),
                 "n_val": len(holdout_set.images)}
    trainer = _Trainer(config, device)
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        _check_resume_compatible(config, ckpt)
        trainer.restore(ckpt)
        log.info("resuming %s at step %d", out, trainer.step)

    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, config)
    (out / "run.json").write_text(json.dumps({
        **data_info, "device": str(device), "holdout_names": list(holdout_set.names),
    }, indent=2) + "\n", encoding="utf-8")

    x_all = to_model_input(train_set.images).to(device)  # (N, C, H, W), small data sets fit in memory
    losses_path = out / "losses.csv"
    new_file = not losses_path.exists() or not resume
    started = time.monotonic()
    bar = tqdm(total=t.steps, initial=min(trainer.step, t.steps), desc="train", unit="step",
               dynamic_ncols=True, mininterval=0.5)
    try:
        with open(losses_path, "w" if new_file else "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(["step", "loss_d", "loss_eg", "loss_recon", "seconds"])
            trainer.model.train()
            while trainer.step < t.steps:
                idx = torch.randint(0, len(x_all), (min(t.batch_size, len(x_all)),), device=device)
                losses = trainer.train_step(augment(x_all[idx], config.data.augment))
                bar.update(1)
                if trainer.step % t.log_every == 0 or trainer.step == t.steps:
                    bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in losses.items()})
                    writer.writerow([trainer.step, *(f"{losses[k]:.5f}" for k in ("loss_d", "loss_eg", "loss_recon")),
                                     f"{time.monotonic() - started:.1f}"])
                    f.flush()
                if trainer.step % t.checkpoint_every == 0:
                    save_checkpoint(ckpt_path, trainer.state(data_info))
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(ckpt_path, trainer.state(data_info))
        log.warning("interrupted at step %d; checkpoint saved, continue with --resume", trainer.step)
        raise
    bar.close()

    refresh_generator_batchnorm(trainer.model, x_all, batch_size=config.calibration.batch_size)
    cal = calibrate(trainer.model, holdout_set.images, nu=config.calibration.nu,
                    quantile=config.calibration.heatmap_quantile, batch_size=config.calibration.batch_size,
                    device=device)
    trainer.calibrated = True
    save_checkpoint(ckpt_path, trainer.state(data_info))
    (out / "calibration.json").write_text(json.dumps(cal.to_dict(), indent=2) + "\n", encoding="utf-8")
    log.info("trained %d steps; threshold %.5f (nu %.3f on %d held-out normals), heatmap scale %.5f",
             trainer.step, cal.threshold, cal.nu, cal.n_images, cal.heatmap_scale)
    return out
