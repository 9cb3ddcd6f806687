"""Synthetic defects painted on normal training images, with the mask of what changed.

Real lines have few or no images of defects, so the trainer makes its own: on a batch
of normal images it paints, per image and with probability `probability`, one of

- ``perlin``: a blob shaped by thresholded Perlin noise (DRAEM, Zavrtanik et al. 2021),
  filled with a flat grey level, with noise, or with texture cut from another normal
  image of the batch, blended with opacity drawn from [0.2, 1];
- ``cutpaste``: a rectangle of the same image moved elsewhere (CutPaste, Li et al. 2021),
  and its long thin "scar" variant;
- ``scratch``: a thin line or a crack of two to four joined segments, one to three pixels
  wide, darker or brighter than the part.

The label is the painted region where the pixel actually changed: paint that happens to
match the part (black on a black background of a circuit board) is not a defect, and
calling it one would teach the segmentation head to guess.

Everything is done in torch on the batch's device, so that a GPU run does not wait on
the CPU for its defects; the random numbers come from one `torch.Generator`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

KINDS = ("perlin", "cutpaste", "scratch")
# A pixel whose value moved by less than this (in [-1, 1] units: 3 grey levels) is unchanged.
CHANGED = 3.0 / 127.5


def _rand(gen: torch.Generator, *shape: int, device: torch.device) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device="cpu").to(device)


def perlin(height: int, width: int, res_y: int, res_x: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """2-D Perlin noise (H, W) in about [-0.7, 0.7] with res_y x res_x gradient cells."""
    angles = _rand(gen, res_y + 1, res_x + 1, device=device) * 2 * math.pi
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (ry+1, rx+1, 2)
    y = torch.arange(height, device=device, dtype=torch.float32) * res_y / height
    x = torch.arange(width, device=device, dtype=torch.float32) * res_x / width
    yi, xi = y.floor().long(), x.floor().long()
    fy, fx = (y - yi).view(-1, 1), (x - xi).view(1, -1)

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[(yi + dy).view(-1, 1), (xi + dx).view(1, -1)]  # (H, W, 2)
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fx), fade(fy)
    top = torch.lerp(corner(0, 0), corner(0, 1), u)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), u)
    return torch.lerp(top, bottom, v)


def _perlin_mask(h: int, w: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A non-empty blob mask (H, W) in {0, 1}: Perlin noise of a random scale above a threshold."""
    for _ in range(8):
        res_y = 2 ** int(_rand(gen, 1, device=device).item() * 4)  # 1, 2, 4 or 8 cells
        res_x = 2 ** int(_rand(gen, 1, device=device).item() * 4)
        noise = perlin(h, w, res_y, res_x, gen, device)
        mask = (noise > 0.3).float()
        if mask.sum() >= 4:
            return mask
    return mask


def _segment_distance(h: int, w: int, p0: torch.Tensor, p1: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Distance in pixels (H, W) of every pixel centre from the segment p0-p1 ((y, x) points)."""
    yy, xx = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    d = p1 - p0
    t = (((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / d.square().sum().clamp_min(1e-6)).clamp(0, 1)
    return torch.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _scratch_mask(h: int, w: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """A thin line or crack (H, W) in {0, 1}, 1 to 3 px wide (hard-edged: a binarised image has no grey rim)."""
    segments = 1 + int(_rand(gen, 1, device=device).item() * 4)  # 1 = straight scratch, more = crack
    width = 1.0 + 2.0 * _rand(gen, 1, device=device).item()
    length = (0.15 + 0.35 * _rand(gen, 1, device=device).item()) * min(h, w) / segments
    point = _rand(gen, 2, device=device) * torch.tensor([h, w], device=device, dtype=torch.float32)
    angle = _rand(gen, 1, device=device).item() * 2 * math.pi
    distance = torch.full((h, w), math.inf, device=device)
    for _ in range(segments):
        angle += (_rand(gen, 1, device=device).item() - 0.5) * 1.2  # a crack wanders
        step = torch.tensor([math.sin(angle), math.cos(angle)], device=device) * length
        distance = torch.minimum(distance, _segment_distance(h, w, point, point + step, device))
        point = point + step
    return (distance <= width / 2).float()


def _rectangle(h: int, w: int, gen: torch.Generator, device: torch.device, scar: bool) -> tuple[int, int, int, int]:
    """(y, x, height, width) of a CutPaste rectangle: 2-15 % of the area, or a thin scar."""
    r = _rand(gen, 3, device=device)
    if scar:
        rh, rw = max(2, int(h * (0.1 + 0.3 * r[0].item()))), max(1, int(2 + 4 * r[1].item()))
        if r[2].item() < 0.5:
            rh, rw = rw, rh
    else:
        area = (0.02 + 0.13 * r[0].item()) * h * w
        aspect = math.exp((r[1].item() * 2 - 1) * math.log(3.3))
        rh = max(2, min(h - 1, int(math.sqrt(area * aspect))))
        rw = max(2, min(w - 1, int(math.sqrt(area / aspect))))
    y = int(_rand(gen, 1, device=device).item() * (h - rh + 1))
    x = int(_rand(gen, 1, device=device).item() * (w - rw + 1))
    return y, x, rh, rw


def _cutpaste(image: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(damaged (C, H, W), mask (H, W)): a patch of the image moved elsewhere, slightly re-lit."""
    _, h, w = image.shape
    scar = _rand(gen, 1, device=image.device).item() < 0.5
    y, x, rh, rw = _rectangle(h, w, gen, image.device, scar)
    sy = int(_rand(gen, 1, device=image.device).item() * (h - rh + 1))
    sx = int(_rand(gen, 1, device=image.device).item() * (w - rw + 1))
    patch = image[:, sy : sy + rh, sx : sx + rw]
    r = _rand(gen, 2, device=image.device)
    gain = 1.0 + (r[0].item() * 2 - 1) * 0.2 if r[1].item() < 0.5 else 1.0
    damaged = image.clone()
    damaged[:, y : y + rh, x : x + rw] = ((patch + 1) * gain - 1).clamp(-1, 1)
    mask = torch.zeros(h, w, device=image.device)
    mask[y : y + rh, x : x + rw] = 1.0
    return damaged, mask


def _tone(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A tone the part itself has (C, 1, 1): the colour of a random pixel. On a binarised
    board that is copper or substrate, never a grey that no real defect would show."""
    _, h, w = image.shape
    y = int(_rand(gen, 1, device=image.device).item() * h)
    x = int(_rand(gen, 1, device=image.device).item() * w)
    return image[:, y : y + 1, x : x + 1]


def _fill(image: torch.Tensor, other: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What a blob is filled with (C, H, W): a flat tone, noise about a tone, or another image's texture."""
    c, h, w = image.shape
    choice = _rand(gen, 1, device=image.device).item()
    level = _tone(image, gen)
    if choice < 1 / 3:
        return level.expand_as(image).clone()
    if choice < 2 / 3:
        noise = torch.randn(c, h, w, generator=gen).to(image.device)
        return (level + 0.3 * noise).clamp(-1, 1)
    # Another normal image, flipped and rolled, so that the texture is the part's own but out of place.
    shifted = torch.roll(
        other,
        shifts=(int(h * _rand(gen, 1, device=image.device).item()), int(w * _rand(gen, 1, device=image.device).item())),
        dims=(1, 2),
    )
    return shifted.flip(2) if choice < 5 / 6 else shifted.flip(1)


def paint(
    x: torch.Tensor, probability: float, kinds: tuple[str, ...] | list[str], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint defects on a (N, C, H, W) batch in [-1, 1]; returns (damaged batch, mask (N, 1, H, W) in [0, 1]).

    Each image gets one defect with probability `probability`, of a kind drawn from
    `kinds`; the others stay as they are with an empty mask.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"pseudo-defect kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    n, _c, h, w = x.shape
    damaged = x.clone()
    masks = torch.zeros(n, 1, h, w, device=x.device)
    for i in range(n):
        if _rand(gen, 1, device=x.device).item() >= probability:
            continue
        kind = kinds[int(_rand(gen, 1, device=x.device).item() * len(kinds))]
        image = x[i]
        if kind == "cutpaste":
            painted, region = _cutpaste(image, gen)
        elif kind == "scratch":
            region = _scratch_mask(h, w, gen, x.device)
            # The darkest or brightest tone of the part, as a scratch hides or catches the light.
            flat = image.flatten(1)
            dark = _rand(gen, 1, device=x.device).item() < 0.5
            tone = (flat.amin(dim=1) if dark else flat.amax(dim=1)).view(-1, 1, 1)
            # Half of them solid (a cut through copper or coating), half faint (a scuff on metal).
            r = _rand(gen, 2, device=x.device)
            strength = 1.0 if r[0].item() < 0.5 else 0.3 + 0.7 * r[1].item()
            painted = torch.lerp(image, tone.expand_as(image), strength * region)
        else:
            region = _perlin_mask(h, w, gen, x.device)
            # Half of the blobs opaque (missing or extra material), half see-through (stains).
            r = _rand(gen, 2, device=x.device)
            opacity = 1.0 if r[0].item() < 0.5 else 0.2 + 0.8 * r[1].item()
            painted = torch.lerp(image, _fill(image, x[(i + 1) % n], gen), opacity * region)
        changed = (painted - image).abs().amax(dim=0) > CHANGED
        damaged[i] = painted
        masks[i, 0] = (region > 0.5).float() * changed.float()
    return damaged, masks


def paint_frames(images: Any, window: int, kinds: tuple[str, ...] | list[str], seed: int) -> Any:
    """A copy of uint8 (H, W, C) frames with one defect each, painted in a random `window`-sized square.

    The square is the scale training painted at (one crop), so that a native-size frame
    gets a defect as large as the ones the model learned, not one stretched over the
    whole frame. Texture fills come from the next frame. `images` is an (N, H, W, C)
    array or a list of frames of different sizes; the result is of the same type.
    """
    gen = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    painted = []
    for i, frame in enumerate(images):
        h, w = frame.shape[:2]
        other = images[(i + 1) % len(images)]
        side_y, side_x = min(window, h, other.shape[0]), min(window, w, other.shape[1])
        y = int(_rand(gen, 1, device=cpu).item() * (h - side_y + 1))
        x = int(_rand(gen, 1, device=cpu).item() * (w - side_x + 1))
        pair = np.stack([frame[y : y + side_y, x : x + side_x], other[:side_y, :side_x]])
        as_float = torch.from_numpy(pair).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        # A defect that changed nothing (a scratch that left the square) would be a normal labelled bad.
        for _attempt in range(10):
            damaged, mask = paint(as_float, 1.0, kinds, gen)
            if mask[0].any():
                break
        out = frame.copy()
        out[y : y + side_y, x : x + side_x] = (
            ((damaged[0].permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        )
        painted.append(out)
    return np.stack(painted) if isinstance(images, np.ndarray) else painted
