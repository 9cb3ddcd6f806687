"""Synthetic machined parts under a triggered line camera, with exact defect masks.

The scene is a turned steel washer lying in its fixture on a dark conveyor belt, lit by
a bar light from the upper left: brushed (turned) metal with directional streaks, a
bevel on both rims, a soft lighting gradient, a specular band from the bar light, a
contact shadow on the belt, small pose and exposure variation from part to part, and
sensor noise. Defects are drawn on the part's own frame, so they move with the part:

- ``scratch``: a thin, slightly curved groove, darker or brighter than the metal;
- ``dent``: a shaded pit (dark wall facing away from the light, bright far wall);
- ``stain``: a rusty or oily discoloured patch with an irregular border;
- ``missing_material``: a chip cut out of the outer rim, showing the belt behind it.

Every part is rendered at the camera resolution (`CAMERA_SIZE`, or the requested size
when that is larger) and reduced with ``cv2.resize(..., interpolation=cv2.INTER_AREA)``,
the same call the edge daemon applies to camera frames, so the data set and the
conveyor video share one pixel pipeline and one noise statistic.

Masks are exact by construction: each part is rendered twice from the same random draw,
without and with its defect, sharing the same sensor noise; the mask marks the pixels
whose noise-free rendering differs by at least `MASK_THRESHOLD_LEVELS` grey levels at
the output size (enclosed gaps filled). Pixels outside the mask differ by less than that
between the two renderings.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ganspect.edge.errors import GanspectError

# Side of the square frame the simulated line camera delivers.
CAMERA_SIZE = 256
DEFECT_KINDS: tuple[str, ...] = ("scratch", "dent", "stain", "missing_material")
# A defect pixel is one whose noise-free rendering changes by at least this much (0..255
# scale, any channel): below it the change is invisible under the sensor noise.
MASK_THRESHOLD_LEVELS = 3.0
MIN_SIZE = 32

# Part geometry as fractions of the frame side (the washer fills most of the fixture).
_OUTER_RADIUS = 0.34
_INNER_RADIUS = 0.14
_BEVEL = 0.018
# Light comes from the upper left (image y points down); unit vector towards the light.
_LIGHT = np.array([-0.6, -0.8], dtype=np.float32)

# Summary keys and the seed streams of the three splits (and of the conveyor video).
_STREAM_TRAIN, _STREAM_TEST_GOOD, _STREAM_TEST_BAD, _STREAM_VIDEO = 1, 2, 3, 4


@dataclass(frozen=True)
class RenderedPart:
    """One part rendered with and without its defect from the same random draw."""

    image: np.ndarray  # uint8 (H, W, 3) BGR: the part as the camera sees it (with its defect, if any)
    clean: np.ndarray  # uint8 (H, W, 3) BGR: the same part, pose, light and noise, without the defect
    mask: np.ndarray  # uint8 (H, W): 255 where the defect changes the image, 0 elsewhere


@dataclass(frozen=True)
class ConveyorPart:
    part_id: str  # e.g. "P0001"
    frame_index: int  # frame in the video that shows this part
    defect: str | None  # None for a good part, else one of DEFECT_KINDS


@dataclass(frozen=True)
class _Pose:
    cx: float  # part centre in pixels
    cy: float
    angle: float  # radians, counter-clockwise in the image
    scale: float


# ---------------------------------------------------------------------------------------
# Scene pieces. Images are float32 in [0, 1], shape (S, S, 3) BGR unless said otherwise.


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_x: float, sigma_y: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian noise blurred with the given sigmas (pixels): (H, W) float32."""
    field: np.ndarray = rng.standard_normal(shape).astype(np.float32)
    field = cv2.GaussianBlur(
        field, (0, 0), sigmaX=max(sigma_x, 0.1), sigmaY=max(sigma_y, 0.1), borderType=cv2.BORDER_REFLECT
    )
    std = float(field.std())
    return field / std if std > 0 else field


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """Dark rubber conveyor belt with a fine weave, and the fixture's two guide rails."""
    y = np.arange(s, dtype=np.float32)[:, None] / s
    weave = 0.5 + 0.5 * np.sin(2 * np.pi * (y * 48 + rng.uniform(0, 1)))  # belt moves: random phase
    grain = _smooth_noise(rng, (s, s), 0.004 * s, 0.002 * s)
    level = 0.15 + 0.015 * weave + 0.008 * grain  # (S, S)
    bg = level[..., None] * np.array([1.0, 1.04, 1.08], dtype=np.float32)  # faintly warm rubber
    # Anodised aluminium rails above and below the part (fixed to the camera).
    rail: np.ndarray = np.zeros((s, 1), dtype=np.float32)
    rail_w = round(0.05 * s)
    rail[:rail_w] = 1.0
    rail[s - rail_w :] = 1.0
    rail = cv2.GaussianBlur(rail, (0, 0), sigmaX=0.1, sigmaY=0.003 * s + 0.3)
    rail_shade = 0.36 + 0.05 * np.cos(np.pi * y)  # the rail nearer the light is brighter
    bg = bg * (1 - rail[..., None]) + (rail * rail_shade)[..., None] * np.array([0.98, 0.96, 0.93], np.float32)
    return bg.astype(np.float32)


def _draw_pose(rng: np.random.Generator, s: int) -> _Pose:
    """A fixtured part: a few % of shift, a few degrees of rotation, ±2 % scale."""
    return _Pose(
        cx=(s - 1) / 2 + rng.uniform(-0.03, 0.03) * s,
        cy=(s - 1) / 2 + rng.uniform(-0.03, 0.03) * s,
        angle=float(np.deg2rad(rng.uniform(-4.0, 4.0))),
        scale=rng.uniform(0.98, 1.02),
    )


def _part_coords(pose: _Pose, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Each camera pixel's position in the part's own frame, in frame-side units: (u, v), each (S, S)."""
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    dx, dy = x - pose.cx, y - pose.cy
    c, si = np.cos(pose.angle), np.sin(pose.angle)
    # Inverse rotation takes camera offsets back to the part frame.
    u = (c * dx - si * dy) / (pose.scale * s)
    v = (si * dx + c * dy) / (pose.scale * s)
    return u.astype(np.float32), v.astype(np.float32)


def _coverage(signed_distance_px: np.ndarray) -> np.ndarray:
    """Anti-aliased inside-coverage from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - signed_distance_px, 0.0, 1.0).astype(np.float32)


def _sample(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample a (T, T) texture that spans part-frame coordinates [-0.5, 0.5) at (u, v)."""
    t = texture.shape[0]
    map_x = ((u + 0.5) * t).astype(np.float32)
    map_y = ((v + 0.5) * t).astype(np.float32)
    return cv2.remap(texture, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@dataclass(frozen=True)
class _Scene:
    """Everything about one part that does not depend on its defect."""

    s: int
    pose: _Pose
    u: np.ndarray  # (S, S) part-frame coordinates
    v: np.ndarray
    background: np.ndarray  # (S, S, 3)
    streaks: np.ndarray  # (S, S) brushed texture in the camera frame, unit std
    metal: np.ndarray  # (3,) base metal colour
    gradient_dir: np.ndarray  # (2,) direction of the lighting fall-off
    gradient_gain: float
    band_angle: float  # specular band from the bar light
    band_offset: float
    band_width: float
    band_gain: float
    exposure_gain: float
    exposure_offset: float


def _draw_scene(rng: np.random.Generator, s: int) -> _Scene:
    pose = _draw_pose(rng, s)
    u, v = _part_coords(pose, s)
    # Brushed/turned finish: streaks along the part's x axis, long in one direction and
    # thin in the other, so they rotate with the part.
    tex = max(s, 128)
    streaks = _smooth_noise(rng, (tex, tex), 0.12 * tex, 0.0025 * tex)
    streaks = 0.7 * streaks + 0.3 * _smooth_noise(rng, (tex, tex), 0.03 * tex, 0.0015 * tex)
    theta = rng.uniform(-0.15, 0.15) + np.pi / 4
    grey = rng.uniform(0.60, 0.64)
    return _Scene(
        s=s,
        pose=pose,
        u=u,
        v=v,
        background=_background(rng, s),
        streaks=_sample(streaks, u, v),
        metal=np.array([grey * 1.02, grey * 1.0, grey * 0.97], dtype=np.float32),  # cool steel
        gradient_dir=np.array([np.cos(theta), np.sin(theta)], dtype=np.float32),
        gradient_gain=rng.uniform(0.14, 0.20),
        band_angle=float(np.deg2rad(rng.uniform(-58, -52))),
        band_offset=rng.uniform(-0.06, 0.0),
        band_width=rng.uniform(0.07, 0.09),
        band_gain=rng.uniform(0.16, 0.22),
        exposure_gain=rng.uniform(0.96, 1.04),
        exposure_offset=rng.uniform(-0.015, 0.015),
    )


def _washer_alpha(scene: _Scene) -> np.ndarray:
    """Coverage of the washer (ring) in the camera frame: (S, S) in [0, 1]."""
    rho_px = np.hypot(scene.u, scene.v) * scene.pose.scale * scene.s
    outer = rho_px - _OUTER_RADIUS * scene.s
    inner = _INNER_RADIUS * scene.s - rho_px
    return _coverage(np.maximum(outer, inner))


def _metal_shading(scene: _Scene) -> np.ndarray:
    """Lit metal colour at every pixel as if the part covered it: (S, S, 3)."""
    s = scene.s
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    dx, dy = x - scene.pose.cx, y - scene.pose.cy
    rho = np.hypot(dx, dy) + 1e-6
    radial = np.stack([dx / rho, dy / rho], axis=-1)  # outward unit vector, camera frame
    facing = radial @ _LIGHT  # (S, S): +1 where the outward normal faces the light
    r_out, r_in, bevel = (_OUTER_RADIUS * s * scene.pose.scale, _INNER_RADIUS * s * scene.pose.scale, _BEVEL * s)
    # Bevels tilt outward at the outer rim and inward at the hole: brighter where they face the light.
    outer_bevel = np.clip((rho - (r_out - bevel)) / bevel, 0, 1)
    inner_bevel = np.clip(((r_in + bevel) - rho) / bevel, 0, 1)
    bevel_light = 0.45 * (outer_bevel * facing - inner_bevel * facing) - 0.12 * (outer_bevel + inner_bevel)
    # Lighting fall-off across the frame and the bar light's specular band (camera-fixed).
    xn, yn = x / s - 0.5, y / s - 0.5
    fall_off = 1.0 - scene.gradient_gain * (xn * scene.gradient_dir[0] + yn * scene.gradient_dir[1])
    along = xn * np.cos(scene.band_angle) + yn * np.sin(scene.band_angle)
    band = scene.band_gain * np.exp(-(((along - scene.band_offset) / scene.band_width) ** 2))
    face = 1.0 + 0.05 * scene.streaks + bevel_light
    lum = (face * fall_off)[..., None] * scene.metal + (band * (1 - 0.5 * (outer_bevel + inner_bevel)))[..., None]
    return lum.astype(np.float32)


def _compose(scene: _Scene, metal: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Belt, contact shadow and part, then exposure: (S, S, 3), noise-free."""
    s = scene.s
    # The bar light is up-left, so the part's soft shadow falls down-right on the belt.
    shift = np.array([[1, 0, 0.012 * s], [0, 1, 0.016 * s]], dtype=np.float32)
    shadow = cv2.warpAffine(alpha, shift, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    shadow = cv2.GaussianBlur(shadow, (0, 0), sigmaX=0.014 * s)
    bg = scene.background * (1 - 0.55 * shadow)[..., None]
    img = bg * (1 - alpha[..., None]) + metal * alpha[..., None]
    return img * scene.exposure_gain + scene.exposure_offset


# ---------------------------------------------------------------------------------------
# Defects: each returns the changed (metal, alpha) pair; the rest of the scene is shared.


def _point_on_face(rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A random point on the washer face (part frame), at least `margin` from both rims."""
    lo, hi = _INNER_RADIUS + margin, _OUTER_RADIUS - margin
    radius = rng.uniform(lo, max(lo, hi))
    phi = rng.uniform(0, 2 * np.pi)
    return radius * np.cos(phi), radius * np.sin(phi)


def _scratch(rng: np.random.Generator, scene: _Scene, metal: np.ndarray) -> np.ndarray:
    """A thin, gently curved groove along an arc; tapered at both ends."""
    s = scene.s
    cu, cv_ = _point_on_face(rng, 0.03)
    length = rng.uniform(0.28, 0.40)
    half_width = rng.uniform(0.012, 0.016) * s  # pixels
    heading = rng.uniform(0, 2 * np.pi)
    bend = rng.uniform(0.6, 1.6) * rng.choice([-1.0, 1.0])  # radius of the arc in frame units
    # Arc: centre offset perpendicular to the heading from the scratch's mid-point.
    normal = np.array([-np.sin(heading), np.cos(heading)])
    centre = np.array([cu, cv_]) + bend * normal
    radius = abs(bend)
    du, dv = scene.u - centre[0], scene.v - centre[1]
    dist = np.hypot(du, dv)
    mid_angle = np.arctan2(cv_ - centre[1], cu - centre[0])
    rel = np.angle(np.exp(1j * (np.arctan2(dv, du) - mid_angle)))  # angle from the mid-point
    half_span = length / (2 * radius)
    along = np.clip(np.abs(rel) / half_span, 0, None)  # 0 at the middle, 1 at the tips
    across_px = np.abs(dist - radius) * scene.pose.scale * s
    profile = np.clip(1 - (across_px / half_width) ** 2, 0, 1)
    taper = np.clip(1 - along**4, 0, 1)
    depth = (profile * taper).astype(np.float32)
    if rng.random() < 0.5:
        change = 1 - rng.uniform(0.45, 0.6) * depth  # groove in shadow
        return metal * change[..., None]
    return metal + (rng.uniform(0.28, 0.38) * depth)[..., None]  # burnished edge catching the light


def _dent(rng: np.random.Generator, scene: _Scene, metal: np.ndarray) -> np.ndarray:
    """A round pit: darker inside, its wall facing the light bright and the other dark."""
    radius = rng.uniform(0.055, 0.072)
    cu, cv_ = _point_on_face(rng, radius * 0.9)
    du, dv = (scene.u - cu) / radius, (scene.v - cv_) / radius
    r2 = du**2 + dv**2
    inside = r2 < 1
    depth = np.where(inside, (1 - r2) ** 2, 0).astype(np.float32)  # smooth bowl, 0 at the rim
    # Surface slope of the bowl, rotated to the camera frame to shade against the light.
    gu = np.where(inside, -4 * du * (1 - r2), 0)
    gv = np.where(inside, -4 * dv * (1 - r2), 0)
    c, si = np.cos(scene.pose.angle), np.sin(scene.pose.angle)
    gx, gy = c * gu + si * gv, -si * gu + c * gv
    # The bowl's wall whose normal tilts towards the light is lit: normal ~ (-gx, -gy) for depth.
    slope_light = (gx * _LIGHT[0] + gy * _LIGHT[1]).astype(np.float32)
    strength = rng.uniform(0.5, 0.65)
    change = 1 - strength * depth + 0.24 * slope_light
    return metal * change[..., None]


def _stain(rng: np.random.Generator, scene: _Scene, metal: np.ndarray) -> np.ndarray:
    """A rust or oil patch with a ragged border; darker in grey too."""
    s = scene.s
    radius = rng.uniform(0.07, 0.095)
    cu, cv_ = _point_on_face(rng, 0.02)
    rho = np.hypot(scene.u - cu, scene.v - cv_) / radius
    tex = max(s, 128)
    ragged = _sample(_smooth_noise(rng, (tex, tex), 0.02 * tex, 0.02 * tex), scene.u, scene.v)
    mottle = _sample(_smooth_noise(rng, (tex, tex), 0.006 * tex, 0.006 * tex), scene.u, scene.v)
    field = 1 - rho + 0.3 * ragged  # > 0 inside the ragged blob
    cover = np.clip(field / 0.25, 0, 1)
    cover = (cover * cover * (3 - 2 * cover)).astype(np.float32)  # smoothstep: soft rim, 0 outside
    if rng.random() < 0.6:
        tint = np.array([0.42, 0.62, 0.95], dtype=np.float32)  # rust: orange-brown, BGR
    else:
        tint = np.array([0.62, 0.58, 0.55], dtype=np.float32)  # oil: dark, faintly warm
    strength = rng.uniform(0.7, 0.9) * (1 + 0.12 * mottle)
    factor = 1 - (cover * strength)[..., None] * (1 - tint)
    return metal * factor


def _missing_material(rng: np.random.Generator, scene: _Scene, alpha: np.ndarray) -> np.ndarray:
    """A chip broken out of the outer rim: the part's coverage loses a rounded bite."""
    s = scene.s
    radius = rng.uniform(0.06, 0.08)
    phi = rng.uniform(0, 2 * np.pi)
    reach = _OUTER_RADIUS + radius * rng.uniform(0.0, 0.3)
    cu, cv_ = reach * np.cos(phi), reach * np.sin(phi)
    # Slightly elliptical bite, elongated along the rim.
    du, dv = scene.u - cu, scene.v - cv_
    t = np.cos(phi) * du + np.sin(phi) * dv  # radial
    n = -np.sin(phi) * du + np.cos(phi) * dv  # along the rim
    stretch = rng.uniform(1.1, 1.4)
    dist = np.hypot(t, n / stretch) - radius  # approximate signed distance, frame units
    bite = _coverage(dist * scene.pose.scale * s)
    return (alpha * (1 - bite)).astype(np.float32)


def _sensor_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Read noise plus shot noise whose variance grows with the signal: same shape as image."""
    gauss = rng.standard_normal(image.shape).astype(np.float32)
    sigma = np.sqrt((1.8 / 255) ** 2 + 0.00009 * np.clip(image, 0, 1))
    return gauss * sigma


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions of a 0/1 mask that do not touch the border: (H, W) uint8."""
    padded = np.pad(mask, 1).astype(np.uint8)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 2)
    return np.where(flood[1:-1, 1:-1] == 2, 0, 1).astype(np.uint8)


def render_pair(
    rng: np.random.Generator, defect: str | None, frame_size: int = CAMERA_SIZE, out_size: int | None = None
) -> RenderedPart:
    """Render one part at `frame_size` and reduce it to `out_size` with INTER_AREA.

    Returns the part with and without its defect (same pose, light and sensor noise) and
    the exact defect mask at `out_size` (all zero for a good part).
    """
    if defect is not None and defect not in DEFECT_KINDS:
        raise GanspectError(f"unknown defect kind {defect!r}; expected one of {', '.join(DEFECT_KINDS)}")
    if frame_size < MIN_SIZE:
        raise GanspectError(f"frame size must be at least {MIN_SIZE} pixels, got {frame_size}")
    out_size = frame_size if out_size is None else out_size
    if out_size < 1:
        raise GanspectError(f"output size must be positive, got {out_size}")
    scene = _draw_scene(rng, frame_size)
    alpha = _washer_alpha(scene)
    metal = _metal_shading(scene)
    clean = _compose(scene, metal, alpha)
    if defect == "scratch":
        dirty = _compose(scene, _scratch(rng, scene, metal), alpha)
    elif defect == "dent":
        dirty = _compose(scene, _dent(rng, scene, metal), alpha)
    elif defect == "stain":
        dirty = _compose(scene, _stain(rng, scene, metal), alpha)
    elif defect == "missing_material":
        dirty = _compose(scene, metal, _missing_material(rng, scene, alpha))
    else:
        dirty = clean
    # One noise draw for both renderings, so they differ only where the defect is.
    noise = _sensor_noise(rng, clean)
    image, clean_image = _to_uint8(dirty + noise), _to_uint8(clean + noise)
    if out_size != frame_size:
        image, clean_image = _resize(image, out_size), _resize(clean_image, out_size)
    mask = np.zeros((out_size, out_size), dtype=np.uint8)
    if defect is not None:
        delta = np.abs(_resize(dirty, out_size) - _resize(clean, out_size)).max(axis=-1) * 255
        mask = _fill_holes((delta >= MASK_THRESHOLD_LEVELS).astype(np.uint8)) * 255
    return RenderedPart(image=image, clean=clean_image, mask=mask)


def render_part(
    rng: np.random.Generator, defect: str | None, frame_size: int = CAMERA_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """One camera frame of a part: (uint8 (S, S, 3) BGR image, uint8 (S, S) mask, 255 = defect)."""
    part = render_pair(rng, defect, frame_size)
    return part.image, part.mask


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    # The edge daemon's reduction of a camera frame to the model size.
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------------------------------
# Data set (MVTec AD layout)


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    # One independent generator per image: a file depends only on (seed, split, index).
    return np.random.default_rng([seed, stream, index])


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise GanspectError(f"seed must not be negative, got {seed}")


def _check_args(size: int, counts: dict[str, int]) -> None:
    if size < MIN_SIZE:
        raise GanspectError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    for name, value in counts.items():
        if value < 0:
            raise GanspectError(f"{name} must not be negative, got {value}")
    if counts["n_train"] == 0:
        raise GanspectError("n_train must be at least 1: a model needs good images to learn from")


def _prepare_out(out: Path) -> None:
    """Create `out`; if it holds an earlier data set (a train/ folder), clear its layout folders."""
    if out.exists() and not out.is_dir():
        raise GanspectError(f"output path {out} exists and is not a folder")
    if (out / "train").is_dir():
        for name in ("train", "test", "ground_truth"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise GanspectError(f"could not write {path}")


def synthesize_dataset(
    out: Path, size: int, n_train: int, n_test_good: int, n_test_bad: int, seed: int
) -> dict[str, int]:
    """Write an MVTec AD layout data set of synthetic washers and return image counts per folder.

    Layout: ``train/good``, ``test/good``, ``test/<defect>`` and
    ``ground_truth/<defect>/<name>_mask.png`` (255 = defect). Defective test images cycle
    through `DEFECT_KINDS`. If `out` already holds a ``train/`` folder (an earlier data
    set), the ``train/``, ``test/`` and ``ground_truth/`` folders are deleted and rewritten;
    other files in `out` are left alone. The same arguments give byte-identical files.
    """
    out = Path(out)
    _check_seed(seed)
    _check_args(size, {"n_train": n_train, "n_test_good": n_test_good, "n_test_bad": n_test_bad})
    _prepare_out(out)
    frame = max(CAMERA_SIZE, size)
    summary: dict[str, int] = {}

    for split, stream, count in (("train", _STREAM_TRAIN, n_train), ("test", _STREAM_TEST_GOOD, n_test_good)):
        for i in range(count):
            part = render_pair(_rng(seed, stream, i), None, frame, size)
            _write_png(out / split / "good" / f"{i:03d}.png", part.image)
        summary[f"{split}/good"] = count

    per_kind: dict[str, int] = {kind: 0 for kind in DEFECT_KINDS}
    for i in range(n_test_bad):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        part = render_pair(_rng(seed, _STREAM_TEST_BAD, i), kind, frame, size)
        name = f"{per_kind[kind]:03d}"
        _write_png(out / "test" / kind / f"{name}.png", part.image)
        _write_png(out / "ground_truth" / kind / f"{name}_mask.png", part.mask)
        per_kind[kind] += 1
    summary.update({f"test/{kind}": n for kind, n in per_kind.items() if n})
    return summary


# ---------------------------------------------------------------------------------------
# Conveyor video


def truth_path(video: Path) -> Path:
    """Where the ground-truth sidecar of `video` lives: ``<video>.truth.json``."""
    video = Path(video)
    return video if video.name.endswith(".truth.json") else video.with_name(video.name + ".truth.json")


def write_conveyor_truth(video: Path, parts: list[ConveyorPart], fps: float) -> Path:
    """Write the sidecar listing every part's id, frame and defect; returns its path."""
    path = truth_path(video)
    doc = {
        "video": Path(video).name,
        "fps": fps,
        "parts": [{"part_id": p.part_id, "frame_index": p.frame_index, "defect": p.defect} for p in parts],
    }
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def read_conveyor_truth(path: Path) -> list[ConveyorPart]:
    """Read the parts of a conveyor video from its sidecar (pass the video or the sidecar path)."""
    sidecar = truth_path(path)
    try:
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
        return [
            ConveyorPart(
                part_id=str(p["part_id"]),
                frame_index=int(p["frame_index"]),
                defect=None if p["defect"] is None else str(p["defect"]),
            )
            for p in doc["parts"]
        ]
    except FileNotFoundError:
        raise GanspectError(f"no ground-truth file {sidecar}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise GanspectError(f"ground-truth file {sidecar} is not valid: {exc}") from None


def _plan_parts(n_parts: int, defect_rate: float, seed: int) -> list[ConveyorPart]:
    """Exactly round(n_parts * defect_rate) defective parts at random positions, kinds cycled."""
    rng = np.random.default_rng([seed, _STREAM_VIDEO])
    n_bad = round(n_parts * defect_rate)
    bad_frames = sorted(rng.choice(n_parts, size=n_bad, replace=False).tolist()) if n_bad else []
    defects: dict[int, str] = {f: DEFECT_KINDS[k % len(DEFECT_KINDS)] for k, f in enumerate(bad_frames)}
    return [ConveyorPart(part_id=f"P{i + 1:04d}", frame_index=i, defect=defects.get(i)) for i in range(n_parts)]


def render_conveyor_frame(part: ConveyorPart, seed: int, frame_size: int = CAMERA_SIZE) -> np.ndarray:
    """The camera frame of `part` in the conveyor video of `seed`: uint8 (S, S, 3) BGR."""
    image, _ = render_part(_rng(seed, _STREAM_VIDEO, part.frame_index), part.defect, frame_size)
    return image


def write_conveyor_video(
    path: Path, n_parts: int, defect_rate: float, seed: int, fps: float = 5.0, frame_size: int = CAMERA_SIZE
) -> list[ConveyorPart]:
    """Write a lossless (FFV1 .avi) video of a triggered line camera, one frame per part.

    Each frame is a part rendered by `render_part` at `frame_size` with its own pose and
    light. Writes the ground-truth sidecar (`truth_path`) too and returns the parts.
    """
    path = Path(path)
    _check_seed(seed)
    if n_parts < 1:
        raise GanspectError(f"n_parts must be at least 1, got {n_parts}")
    if not 0.0 <= defect_rate <= 1.0:
        raise GanspectError(f"defect_rate must be between 0 and 1, got {defect_rate}")
    if fps <= 0:
        raise GanspectError(f"fps must be positive, got {fps}")
    if frame_size < MIN_SIZE:
        raise GanspectError(f"frame size must be at least {MIN_SIZE} pixels, got {frame_size}")
    if path.suffix.lower() != ".avi":
        raise GanspectError(f"conveyor video must be an .avi file (lossless FFV1), got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = _plan_parts(n_parts, defect_rate, seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"FFV1"), fps, (frame_size, frame_size), True)
    if not writer.isOpened():
        raise GanspectError(f"OpenCV could not open a FFV1 video writer for {path} (is OpenCV built with FFmpeg?)")
    try:
        for part in parts:
            writer.write(render_conveyor_frame(part, seed, frame_size))
    finally:
        writer.release()
    write_conveyor_truth(path, parts, fps)
    return parts
