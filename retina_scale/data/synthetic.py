"""Synthetic fundus photographs with diabetic-retinopathy lesions drawn at their physical sizes.

The embedded default data set of ``retina_scale``: no real DR data set can be fetched by the project's
machines, so this module draws one. Every photo is graded by the International Clinical DR scale
(0 no DR, 1 microaneurysms only, 2 moderate, 3 severe by the 4-2-1 rule, 4 proliferative) from the lesions
that were actually drawn, and every lesion is recorded (kind, position, size in pixels and micrometres).

Two kinds of background, so that a model cannot memorise one retina:

* ``real``: scikit-image's one real human fundus photograph (``skimage.data.retina()``, a left eye) under
  random geometric (rotation, scale, shift, up/down flip) and photometric (channel gains, gamma) variation;
* ``procedural``: a drawn fundus: orange-red pigment with choroidal texture, vignetting and an illumination
  gradient; an optic disc of about 1/7 of the field diameter with a pale cup; a darker macula about two
  disc-diameters temporal to the disc; a branching vessel tree leaving the disc, veins wider and darker than
  arteries, the temporal arcades curving around the macula.

Geometry: the photo is drawn in the frame of a right eye (disc on the right of the image, as a fundus
camera shows a right eye) and mirrored for left eyes. ``size`` is the diameter of the fundus disc in
pixels and the 45-degree field is taken as 12 mm across, so one pixel is ``12000 / size`` micrometres.

Microaneurysm contrast and profile are calibrated against the real green-channel detail
``skimage.data.microaneurysms()`` (see :func:`measure_dark_spot` and :data:`MA_GREEN_DEPTH`): a 2-D Gaussian
dip with a relative depth of 0.41-0.65 in the green channel, the range measured on its two microaneurysms.
Lesions are drawn by area-integrating a supersampled patch, so a lesion smaller than a pixel darkens that
pixel by the fraction of light it really removes; nothing is tuned to favour any resolution.

Example:

>>> from retina_scale.data.synthetic import render_fundus
>>> image, lesions = render_fundus(0, grade=1, size=256, eye="left")
>>> image.shape, image.dtype
((256, 256, 3), dtype('uint8'))
>>> all(rec["kind"] == "microaneurysm" for rec in lesions)
True

This module imports only NumPy, OpenCV and scikit-image (TensorFlow is never imported).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import cv2
import numpy as np

from retina_scale.config import GRADES
from retina_scale.utils.errors import UserError
from retina_scale.utils.fileio import atomic_path

FIELD_MM = 12.0
"""Diameter of the 45-degree fundus field, in millimetres."""


PRIORS: dict[str, tuple[float, ...]] = {
    # The paper's Table II: EyePACS (Kaggle 2015) training-set class frequencies.
    "eyepacs": (0.7348, 0.0696, 0.1507, 0.0248, 0.0201),
    "balanced": (0.2, 0.2, 0.2, 0.2, 0.2),
}

# Physical size ranges (micrometres) of each lesion kind; ``size_um`` in lesions.csv always lies inside.
# For elongated or extended kinds the size is the longest extent.
LESION_SIZE_UM: dict[str, tuple[float, float]] = {
    "microaneurysm": (25.0, 125.0),
    "dot_blot_haemorrhage": (125.0, 1000.0),
    "flame_haemorrhage": (250.0, 1500.0),
    "hard_exudate": (50.0, 500.0),
    "cotton_wool_spot": (250.0, 1000.0),
    "venous_beading": (600.0, 2500.0),
    "irma": (300.0, 1200.0),
    "nvd": (500.0, 2500.0),
    "nve": (500.0, 2500.0),
    "preretinal_haemorrhage": (1000.0, 4000.0),
    "vitreous_haemorrhage": (3000.0, 8000.0),
}
LESION_KINDS = tuple(LESION_SIZE_UM)
INTRARETINAL_HAEMORRHAGES = ("dot_blot_haemorrhage", "flame_haemorrhage")
PROLIFERATIVE = ("nvd", "nve", "preretinal_haemorrhage", "vitreous_haemorrhage")
QUADRANTS = ("superotemporal", "inferotemporal", "superonasal", "inferonasal")

# Calibration against skimage.data.microaneurysms() (green channel), measured with measure_dark_spot():
# the two microaneurysms in that detail have relative depths 0.654 and 0.414 and Gaussian FWHMs of 3.91 and
# 3.47 px, with a Gaussian-fit RMS residual of 7.6 % and 9.1 % of their depth. tests/data/test_synthetic.py
# re-measures the real detail and a drawn microaneurysm and compares them.
MA_GREEN_DEPTH = (0.41, 0.65)
"""Peak relative darkening of a microaneurysm in the green channel (before pixel integration)."""
MA_CENTRES_IN_REFERENCE = ((16, 23), (48, 71))
"""(x, y) of the two microaneurysms in ``skimage.data.microaneurysms()``."""

# Relative darkening per channel (R, G, B) of blood, as a fraction of the green-channel darkening: blood
# absorbs green and blue strongly and red weakly, which is why red lesions are clearest in the green channel.
_BLOOD_RGB = np.array([0.28, 1.0, 0.8], np.float32)

LESION_COLUMNS = (
    "image", "kind", "x", "y", "size_px", "size_um", "quadrant", "depth", "cluster",
)
IMAGE_COLUMNS = (
    "image", "patient", "eye", "level", "true_level", "background", "seed", "width", "height",
    "field_diameter_px", "um_per_px", "field_x", "field_y", "disc_x", "disc_y", "disc_diameter_px",
    "fovea_x", "fovea_y",
)


# --------------------------------------------------------------------------------------------------------
# Priors, patients and grades
# --------------------------------------------------------------------------------------------------------

def parse_prior(prior: str | Sequence[float]) -> np.ndarray:
    """Turn a prior name (``eyepacs``, ``balanced``) or five comma-separated fractions into probabilities.

    Args:
        prior: a name from :data:`PRIORS`, a string ``"a,b,c,d,e"`` or a sequence of five numbers.

    Returns:
        A float array of five probabilities summing to 1.

    Raises:
        ValueError: unknown name, wrong length, negative values or a sum other than 1 (within 1e-3).
    """
    if isinstance(prior, str):
        text = prior.strip().lower()
        if text in PRIORS:
            return np.asarray(PRIORS[text], float) / sum(PRIORS[text])
        if "," not in text:
            raise UserError(
                f"unknown prior {prior!r}; accepted: {', '.join(PRIORS)} or five comma-separated "
                "fractions a,b,c,d,e summing to 1"
            )
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise UserError(
                f"prior {prior!r} is not five comma-separated numbers; accepted: {', '.join(PRIORS)} "
                "or a,b,c,d,e summing to 1"
            ) from None
    else:
        values = [float(v) for v in prior]
    if len(values) != 5:
        raise UserError(f"prior has {len(values)} values; it needs exactly 5 (grades 0-4) summing to 1")
    arr = np.asarray(values, float)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise UserError(f"prior {values} has negative or non-finite values; each must be in [0, 1]")
    if abs(arr.sum() - 1.0) > 1e-3:
        raise UserError(f"prior {values} sums to {arr.sum():.4f}; the five fractions must sum to 1")
    return arr / arr.sum()


def fellow_eye_kernel(prior: np.ndarray, p_adjacent: float = 0.35, p_far: float = 0.05) -> np.ndarray:
    """Transition matrix from one eye's grade to the fellow eye's grade.

    A Metropolis kernel: propose an adjacent grade with probability ``p_adjacent`` and any other grade with
    probability ``p_far``, accept with ``min(1, prior[j] / prior[i])``. It is reversible with respect to
    ``prior``, so both eyes have the prior as their marginal distribution and the joint is symmetric, while
    most patients have the same or an adjacent grade in both eyes.
    """
    n = len(prior)
    kernel = np.zeros((n, n))
    for i in range(n):
        if prior[i] == 0:
            kernel[i, i] = 1.0
            continue
        adjacent = [j for j in (i - 1, i + 1) if 0 <= j < n]
        far = [j for j in range(n) if abs(j - i) > 1]
        for j in adjacent:
            kernel[i, j] += p_adjacent / 2 * min(1.0, prior[j] / prior[i])
        for j in far:
            kernel[i, j] += p_far / len(far) * min(1.0, prior[j] / prior[i])
        kernel[i, i] = 1.0 - kernel[i].sum()
    return kernel


@dataclass(frozen=True)
class ImageSpec:
    """What one photo of the data set will show (decided before drawing, so workers only draw)."""

    name: str
    patient: int
    eye: str
    true_level: int
    level: int
    seed: int
    background: str


def plan_dataset(
    count: int,
    seed: int = 0,
    prior: str | Sequence[float] = "eyepacs",
    label_noise: float = 0.0,
    real_fraction: float = 0.3,
) -> list[ImageSpec]:
    """Decide patients, eyes, grades, label noise and per-image seeds, without drawing anything.

    Two eyes per patient (``<patient>_left`` then ``<patient>_right``; with an odd count the last patient has
    only a left eye). The first eye's grade is drawn from ``prior``; the fellow eye's from
    :func:`fellow_eye_kernel`, so both marginals are the prior. With probability ``label_noise`` the written
    label moves to an adjacent grade (0 can only move to 1, 4 only to 3); ``true_level`` keeps the drawn one.

    Args:
        count: number of photos (>= 0).
        seed: master seed; the image seeds derive from it and the image index only.
        prior: see :func:`parse_prior`.
        label_noise: probability in [0, 1] that a label is moved to an adjacent grade.
        real_fraction: fraction of photos drawn on the real background.
    """
    validate_count(count)
    probs = parse_prior(prior)
    if not (0.0 <= float(label_noise) <= 1.0):
        raise UserError(f"label noise {label_noise} is outside [0, 1]")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    kernel = fellow_eye_kernel(probs)
    specs: list[ImageSpec] = []
    n_patients = (count + 1) // 2
    image_seeds = np.random.SeedSequence([int(seed), 0x1A6E]).generate_state(max(count, 1), dtype=np.uint32)
    for p in range(n_patients):
        patient = p + 1
        first = int(rng.choice(5, p=probs))
        second = int(rng.choice(5, p=kernel[first]))
        # which eye gets the first draw is random, so neither eye is favoured
        grades = (first, second) if rng.random() < 0.5 else (second, first)
        for eye, grade in zip(("left", "right"), grades):
            index = len(specs)
            noisy = rng.random() < label_noise
            step = 1 if grade == 0 else -1 if grade == 4 else (1 if rng.random() < 0.5 else -1)
            background = "real" if rng.random() < real_fraction else "procedural"
            if index >= count:
                continue
            specs.append(ImageSpec(
                name=f"{patient}_{eye}", patient=patient, eye=eye, true_level=grade,
                level=grade + step if noisy else grade, seed=int(image_seeds[index]), background=background,
            ))
    return specs


def grade_from_lesions(records: Iterable[dict]) -> int:
    """The International Clinical DR grade implied by a list of lesion records.

    4 if any neovascularisation (``nvd``, ``nve``) or pre-retinal / vitreous haemorrhage; else 3 by the
    4-2-1 rule (more than 20 intraretinal haemorrhages in each of the four quadrants, venous beading in two
    or more quadrants, or IRMA in one or more); else 2 if anything besides microaneurysms; else 1 if any
    microaneurysm; else 0.
    """
    records = list(records)
    kinds = {r["kind"] for r in records}
    if kinds & set(PROLIFERATIVE):
        return 4
    haem = {q: 0 for q in QUADRANTS}
    beading = set()
    for r in records:
        if r["kind"] in INTRARETINAL_HAEMORRHAGES:
            haem[r["quadrant"]] += 1
        elif r["kind"] == "venous_beading":
            beading.add(r["quadrant"])
    if all(n > 20 for n in haem.values()) or len(beading) >= 2 or "irma" in kinds:
        return 3
    if kinds - {"microaneurysm"}:
        return 2
    if kinds:
        return 1
    return 0


def validate_count(count) -> int:
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise UserError(f"count {count} is invalid; it must be a whole number >= 0")
    return int(count)


def validate_size(size) -> int:
    if isinstance(size, bool) or int(size) != size or not 64 <= size <= 4096:
        raise UserError(f"size {size} px is invalid; the fundus diameter must be 64 to 4096 px")
    return int(size)


# --------------------------------------------------------------------------------------------------------
# Small drawing helpers
# --------------------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise: a coarse random grid upsampled bicubically."""
    h, w = shape
    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(grid, (w + 2 * w // cells, h + 2 * h // cells), interpolation=cv2.INTER_CUBIC)
    oy, ox = h // cells, w // cells
    out = big[oy:oy + h, ox:ox + w]
    return (out - out.mean()) / (out.std() + 1e-6)


def _clipped(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int):
    """``(region of img, matching alpha[..., None])`` for a patch placed at (x0, y0), clipped to the
    image; None when the patch falls outside it."""
    h, w = alpha.shape
    H, W = img.shape[:2]
    ax0, ay0 = max(0, -x0), max(0, -y0)
    ax1, ay1 = min(w, W - x0), min(h, H - y0)
    if ax1 <= ax0 or ay1 <= ay0:
        return None
    return img[y0 + ay0:y0 + ay1, x0 + ax0:x0 + ax1], alpha[ay0:ay1, ax0:ax1, None]


def _multiply_patch(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, factors: np.ndarray) -> None:
    """img[y0:, x0:] *= 1 - alpha * factors, clipped to the image."""
    clipped = _clipped(img, alpha, x0, y0)
    if clipped is not None:
        region, a = clipped
        region *= 1.0 - a * factors[None, None, :]


def _blend_patch(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, colour: np.ndarray) -> None:
    """img[y0:, x0:] = (1 - alpha) img + alpha colour, clipped to the image."""
    clipped = _clipped(img, alpha, x0, y0)
    if clipped is not None:
        region, a = clipped
        region *= 1.0 - a
        region += a * colour[None, None, :]


def _patch(cx: float, cy: float, radius_px: float, min_sub: float = 12.0):
    """Pixel window around (cx, cy) and a supersampled coordinate grid over it.

    Returns (x0, y0, w, h, factor, X, Y) where X, Y are the supersampled coordinates in pixels relative to
    (cx, cy). Drawing on the grid and area-averaging by ``factor`` integrates the lesion over each pixel.
    """
    r = max(radius_px, 0.5)
    x0 = int(math.floor(cx - r - 2))
    y0 = int(math.floor(cy - r - 2))
    w = int(math.ceil(cx + r + 2)) - x0 + 1
    h = int(math.ceil(cy + r + 2)) - y0 + 1
    factor = int(min(16, max(2, math.ceil(min_sub / (2 * r)))))
    ys = y0 + (np.arange(h * factor, dtype=np.float32) + 0.5) / factor - 0.5 - cy
    xs = x0 + (np.arange(w * factor, dtype=np.float32) + 0.5) / factor - 0.5 - cx
    X, Y = np.meshgrid(xs, ys)
    return x0, y0, w, h, factor, X, Y


def _integrate(alpha_fine: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.resize(alpha_fine.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)


def _polyline(img_mask: np.ndarray, pts: np.ndarray, thickness: float, scale: int = 1) -> None:
    """Anti-aliased polyline with sub-pixel vertices on a uint8 mask."""
    shift = 4
    p = np.round(pts * scale * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(img_mask, [p], False, 255, max(1, int(round(thickness * scale))), cv2.LINE_AA, shift)


# --------------------------------------------------------------------------------------------------------
# Backgrounds
# --------------------------------------------------------------------------------------------------------

@dataclass
class Anatomy:
    """Where things are in a drawn photo (canonical right-eye frame, pixel units)."""

    size: int
    centre: tuple[float, float]
    radius: float
    disc: tuple[float, float]
    disc_diameter: float
    fovea: tuple[float, float]
    # vessel centre-line samples: x, y, unit direction dx, dy, width px, vein flag
    vessels: np.ndarray = field(default_factory=lambda: np.zeros((0, 6), np.float32))

    @property
    def um_per_px(self) -> float:
        return FIELD_MM * 1000.0 / self.size

    def px(self, micrometres: float) -> float:
        return micrometres / self.um_per_px


def _quadrant(anat: Anatomy, x: float, y: float) -> str:
    """Quadrant by lines through the field centre; temporal is the left half in the right-eye frame."""
    vert = "supero" if y < anat.centre[1] else "infero"
    horiz = "temporal" if x < anat.centre[0] else "nasal"
    return vert + horiz


def _grow_vessels(rng: np.random.Generator, size: int, disc: tuple[float, float], dd: float,
                  fovea: tuple[float, float], radius: float, centre: tuple[float, float]):
    """A branching vessel tree leaving the disc. Returns a list of (points Nx2, widths N, is_vein)."""
    um = FIELD_MM * 1000.0 / size
    step = max(1.0, size / 256.0)
    segments: list[tuple[np.ndarray, np.ndarray, bool]] = []
    R2 = (radius * 0.99) ** 2
    faz2 = (rng.uniform(0.25, 0.4) * dd) ** 2

    def grow(start, heading, width, vein, depth, curvature, decay, length):
        pts = [np.array(start, float)]
        widths = [width]
        s = 0.0
        h = heading
        w = width
        while s < length:
            h += curvature * math.exp(-s / decay) * step + rng.normal(0, (0.05 if depth else 0.015) * math.sqrt(step))
            p = pts[-1] + step * np.array([math.cos(h), math.sin(h)])
            if (p[0] - centre[0]) ** 2 + (p[1] - centre[1]) ** 2 > R2:
                break
            if (p[0] - fovea[0]) ** 2 + (p[1] - fovea[1]) ** 2 < faz2:  # the fovea is vessel-free
                break
            pts.append(p)
            s += step
            w = max(w * (1 - 0.0006 * step), 12.0 / um)
            widths.append(w)
            if depth < 3 and w > 30.0 / um and rng.random() < step / (size * (0.16 if depth else 0.09)):
                side = 1 if rng.random() < 0.5 else -1
                child_w = w * rng.uniform(0.45, 0.7)
                grow(p, h + side * rng.uniform(0.5, 1.1), child_w, vein, depth + 1,
                     side * rng.uniform(0.0, 0.002) * 256 / size, size * 0.2,
                     length=child_w * rng.uniform(40, 90))
                w *= 0.93
        if len(pts) > 1:
            segments.append((np.array(pts), np.array(widths), vein))

    vein_w = rng.uniform(115, 145) / um
    art_w = vein_w * rng.uniform(0.62, 0.75)
    dist = math.hypot(fovea[0] - disc[0], fovea[1] - disc[1])
    kappa = 1.0 / (0.65 * dist)
    for vertical in (-1, 1):  # superior, inferior
        for vein in (True, False):
            off = (rng.uniform(-0.15, 0.15) + (0.08 if vein else -0.08))
            # temporal arcades: leave the disc upward/downward, curve temporally (to the left) around the macula
            heading = vertical * (math.pi / 2) + vertical * off + vertical * 0.2
            grow((disc[0] + rng.uniform(-0.1, 0.1) * dd, disc[1] + vertical * 0.05 * dd), heading,
                 vein_w if vein else art_w, vein, 0, -vertical * kappa * rng.uniform(0.9, 1.15) * -1,
                 dist * rng.uniform(1.2, 1.8), length=size)
            # nasal branches
            heading = vertical * rng.uniform(0.3, 1.0) + (0.0 if vein else 0.15 * vertical)
            grow((disc[0] + 0.05 * dd, disc[1] + vertical * 0.05 * dd), heading,
                 (vein_w if vein else art_w) * rng.uniform(0.6, 0.8), vein, 1, 0.0, size, length=size)
    # small macular and temporal twigs straight from the disc
    for _ in range(rng.integers(2, 5)):
        vein = bool(rng.random() < 0.5)
        grow((disc[0] - 0.1 * dd, disc[1] + rng.uniform(-0.2, 0.2) * dd), math.pi + rng.uniform(-0.3, 0.3),
             art_w * rng.uniform(0.35, 0.5), vein, 2, 0.0, size, length=dist * rng.uniform(0.5, 0.8))
    return segments


def _box(centre: tuple[float, float], half: float, size: int):
    """Slices of a square box around ``centre`` clipped to the image, and its pixel coordinate grids."""
    x0, x1 = max(0, int(centre[0] - half)), min(size, int(centre[0] + half) + 1)
    y0, y1 = max(0, int(centre[1] - half)), min(size, int(centre[1] + half) + 1)
    yy, xx = np.mgrid[y0:max(y0, y1), x0:max(x0, x1)].astype(np.float32)
    return (slice(y0, max(y0, y1)), slice(x0, max(x0, x1))), yy, xx


def _procedural_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, Anatomy]:
    S = size
    c = (S - 1) / 2.0
    radius = S / 2.0
    dd = S / 7.0 * rng.uniform(0.88, 1.1)
    fovea = (c - rng.uniform(0.0, 0.06) * S, c + rng.uniform(-0.03, 0.03) * S)
    ang = rng.uniform(-0.12, 0.12)
    dist = dd * rng.uniform(2.0, 2.5)
    disc = (fovea[0] + dist * math.cos(ang), fovea[1] - dist * math.sin(ang) - 0.05 * dd)
    # pigment: orange-red (the real photo's median is 0.85, 0.33, 0.24), darker and browner when more pigmented
    pigment = rng.uniform(0.0, 1.0)
    base = np.array([0.88 - 0.18 * pigment, 0.36 - 0.12 * pigment, 0.25 - 0.10 * pigment], np.float32)
    base *= rng.uniform(0.93, 1.07, 3).astype(np.float32)
    img = np.empty((S, S, 3), np.float32)
    img[:] = base
    # choroidal texture at several scales (stronger in green/blue, as in real photos)
    tex = (0.02 * _smooth_noise(rng, (S, S), 8) + 0.015 * _smooth_noise(rng, (S, S), 40)
           + 0.012 * _smooth_noise(rng, (S, S), 120))
    img *= 1.0 + tex[..., None] * np.array([0.6, 1.3, 1.3], np.float32)
    # macula: darker, with a darker fovea (real photo: fovea darker by 15 / 49 / 63 % in R / G / B)
    # (computed in a box of 3 disc diameters around the fovea: beyond it the darkening is below 1e-5)
    sl, yy, xx = _box(fovea, 3 * dd, S)
    r2 = ((xx - fovea[0]) ** 2 + (yy - fovea[1]) ** 2) / (dd * dd)
    mac = 0.55 * np.exp(-r2 / (2 * 0.6 ** 2)) + 0.35 * np.exp(-r2 / (2 * 0.15 ** 2))
    img[sl] *= 1.0 - np.clip(mac, 0, 1)[..., None] * np.array([0.15, 0.5, 0.6], np.float32) * rng.uniform(0.7, 1.1)

    # optic disc (pale yellow-orange, ~1/7 of the field) with a paler cup; the vessels are drawn over it
    sl, yy, xx = _box(disc, 1.0 * dd, S)
    ex = ((xx - disc[0]) / (dd / 2)) ** 2 + ((yy - disc[1]) / (dd / 2 * rng.uniform(1.02, 1.12))) ** 2
    rho = np.sqrt(ex)
    disc_a = 0.92 / (1.0 + np.exp(np.clip((rho - 1.0) / 0.06, -50, 50)))
    disc_col = np.array([0.98, 0.74, 0.47], np.float32) * rng.uniform(0.92, 1.03, 3).astype(np.float32)
    cup = rng.uniform(0.2, 0.5)
    cup_a = 1.0 / (1.0 + np.exp(np.clip((rho / cup - 1.0) / 0.15, -50, 50)))
    img[sl] = img[sl] * (1 - disc_a[..., None]) + disc_a[..., None] * disc_col
    img[sl] += cup_a[..., None] * np.array([0.02, 0.12, 0.15], np.float32)

    # vessels: relative darkening per channel (R, G, B) measured on the real photo's vessels
    segments = _grow_vessels(rng, S, disc, dd, fovea, radius, (c, c))
    ss = 2 if S <= 2048 else 1
    masks = {True: np.zeros((S * ss, S * ss), np.uint8), False: np.zeros((S * ss, S * ss), np.uint8)}
    samples = []
    for pts, widths, vein in segments:
        # draw in short pieces so the width can taper
        n = len(pts)
        for i in range(0, n - 1, 4):
            j = min(n, i + 5)
            _polyline(masks[vein], pts[i:j] + 0.5, float(np.mean(widths[i:j])), ss)
        d = np.gradient(pts, axis=0)
        d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
        samples.append(np.column_stack([pts, d, widths, np.full(n, float(vein))]))
    vessels = np.vstack(samples).astype(np.float32) if samples else np.zeros((0, 6), np.float32)
    for vein, colour in ((False, np.array([0.07, 0.30, 0.22], np.float32)),
                         (True, np.array([0.14, 0.45, 0.36], np.float32))):
        m = masks[vein]
        if ss > 1:
            m = cv2.resize(m, (S, S), interpolation=cv2.INTER_AREA)
        a = cv2.GaussianBlur(m.astype(np.float32) / 255.0, (0, 0), max(0.5, S / 2048.0))
        img *= 1.0 - a[..., None] * colour * rng.uniform(0.85, 1.1)
        if not vein:  # arterial light reflex
            core = cv2.erode(m, np.ones((3, 3), np.uint8)).astype(np.float32) / 255.0
            img += 0.03 * cv2.GaussianBlur(core, (0, 0), 1.0)[..., None] * (core[..., None] > 0.9)

    anat = Anatomy(size=S, centre=(c, c), radius=radius, disc=disc, disc_diameter=dd, fovea=fovea,
                   vessels=vessels)
    return img, anat


@functools.lru_cache(maxsize=1)
def _real_reference():
    """The real photo (canonical right-eye frame, float RGB), its anatomy and vessel centre-line samples."""
    from skimage import data as skdata
    from skimage.morphology import skeletonize

    photo = skdata.retina()[:, ::-1].astype(np.float32) / 255.0  # a left eye: mirror to the right-eye frame
    mask = photo[..., 0] > 25 / 255
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = side / 2
    # crop to the fundus bounding square
    M = np.float32([[1, 0, half - cx], [0, 1, half - cy]])
    photo = cv2.warpAffine(photo, M, (side, side), flags=cv2.INTER_LINEAR, borderValue=0)
    green = photo[..., 1]
    # anatomy measured on this photo (disc: brightest blob; fovea: darkest central blob)
    blur = cv2.GaussianBlur(green, (0, 0), side / 60)
    yy, xx = np.mgrid[0:side, 0:side]
    inner = (xx - half) ** 2 + (yy - half) ** 2 < (0.45 * side) ** 2
    dy, dx = np.unravel_index(np.argmax(np.where(inner, blur, 0)), blur.shape)
    central = (xx - half) ** 2 + (yy - half) ** 2 < (0.25 * side) ** 2
    fy, fx = np.unravel_index(np.argmin(np.where(central, cv2.GaussianBlur(green, (0, 0), side / 90), 9)),
                              blur.shape)
    # vessels: black-hat of the green channel
    k = int(side / 60) | 1
    bh = cv2.morphologyEx(green, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    vmask = (bh > 0.035) & ((xx - half) ** 2 + (yy - half) ** 2 < (0.47 * side) ** 2)
    vmask = cv2.morphologyEx(vmask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0
    dist = cv2.distanceTransform(vmask.astype(np.uint8), cv2.DIST_L2, 3)
    skel = skeletonize(vmask)
    sy, sx = np.nonzero(skel)
    widths = 2 * dist[sy, sx]
    keep = widths >= 3
    sx, sy, widths = sx[keep], sy[keep], widths[keep]
    # local direction: structure tensor of the smoothed vessel mask
    sm = cv2.GaussianBlur(vmask.astype(np.float32), (0, 0), 4)
    gx = cv2.Sobel(sm, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(sm, cv2.CV_32F, 0, 1)
    jxx = cv2.GaussianBlur(gx * gx, (0, 0), 6)[sy, sx]
    jyy = cv2.GaussianBlur(gy * gy, (0, 0), 6)[sy, sx]
    jxy = cv2.GaussianBlur(gx * gy, (0, 0), 6)[sy, sx]
    theta = 0.5 * np.arctan2(2 * jxy, jxx - jyy) + np.pi / 2  # along the vessel
    thick = np.percentile(widths, 75)
    vessels = np.column_stack([sx, sy, np.cos(theta), np.sin(theta), widths, widths >= thick]).astype(np.float32)
    disc_diameter = side / 7.5
    return photo, side, (float(dx), float(dy)), (float(fx), float(fy)), disc_diameter, vessels


def _real_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, Anatomy]:
    photo, side, disc, fovea, dd, vessels = _real_reference()
    S = size
    scale = S / side * rng.uniform(0.97, 1.05)
    angle = rng.uniform(-12, 12)
    flip_v = rng.random() < 0.5
    c_src = (side / 2, side / 2)
    M = cv2.getRotationMatrix2D(c_src, angle, scale)
    M[0, 2] += (S - 1) / 2 - c_src[0] + rng.uniform(-0.015, 0.015) * S
    M[1, 2] += (S - 1) / 2 - c_src[1] + rng.uniform(-0.015, 0.015) * S
    if flip_v:
        F = np.array([[1, 0, 0], [0, -1, S - 1], [0, 0, 1]], np.float64)
        M = (F @ np.vstack([M, [0, 0, 1]]))[:2]
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    M_points = M.copy()  # original photo coordinates -> output coordinates
    if scale < 0.5:  # pre-shrink so the affine warp does not alias
        pre = cv2.resize(photo, (int(side * scale * 1.5), int(side * scale * 1.5)), interpolation=cv2.INTER_AREA)
        k = pre.shape[0] / side
        M = M @ np.array([[1 / k, 0, 0], [0, 1 / k, 0], [0, 0, 1]])
        src = pre
    else:
        src = photo
    img = cv2.warpAffine(src, M.astype(np.float32), (S, S), flags=cv2.INTER_LINEAR if interp == cv2.INTER_AREA
                         else cv2.INTER_CUBIC, borderValue=0)
    img = np.clip(img, 0, 1)
    # photometric variation: channel gains and gamma
    gains = np.array([rng.uniform(0.88, 1.1), rng.uniform(0.8, 1.15), rng.uniform(0.7, 1.25)], np.float32)
    img = np.power(np.clip(img * gains, 0, 1), rng.uniform(0.85, 1.2)).astype(np.float32)

    def tx(pts):
        pts = np.asarray(pts, np.float64).reshape(-1, 2)
        return pts @ M_points[:, :2].T + M_points[:, 2]

    vs = vessels.copy()
    vs[:, 0:2] = tx(vessels[:, 0:2])
    vs[:, 2:4] = vessels[:, 2:4] @ M_points[:, :2].T / scale
    vs[:, 4] *= scale
    c = (S - 1) / 2
    R = S / 2
    inside = (vs[:, 0] - c) ** 2 + (vs[:, 1] - c) ** 2 < (0.95 * R) ** 2
    anat = Anatomy(size=S, centre=(c, c), radius=R, disc=tuple(tx(disc)[0]), disc_diameter=dd * scale,
                   fovea=tuple(tx(fovea)[0]), vessels=vs[inside])
    return img, anat


# --------------------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------------------

def _log_uniform(rng, lo, hi):
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


class _LesionPainter:
    """Draws lesions on a float RGB image and keeps their records."""

    def __init__(self, rng: np.random.Generator, img: np.ndarray, anat: Anatomy):
        self.rng, self.img, self.anat = rng, img, anat
        self.records: list[dict] = []
        self._cluster = 0

    # -- placement ------------------------------------------------------------------------------------
    def _inside(self, x, y, margin_px):
        a = self.anat
        return math.hypot(x - a.centre[0], y - a.centre[1]) < a.radius * 0.93 - margin_px

    def _off_disc(self, x, y, factor=0.75):
        a = self.anat
        return math.hypot(x - a.disc[0], y - a.disc[1]) > a.disc_diameter * factor

    def position(self, region="posterior", quadrant=None, margin_px=0.0):
        """A random lesion position: 'posterior' (macula-weighted), 'anywhere' or inside one quadrant."""
        a, rng = self.anat, self.rng
        for _ in range(200):
            if region == "posterior":
                r = abs(rng.normal(0, 2.2 * a.disc_diameter))
                t = rng.uniform(0, 2 * math.pi)
                x, y = a.fovea[0] + r * math.cos(t), a.fovea[1] + r * math.sin(t) * 0.85
            else:
                r = a.radius * math.sqrt(rng.uniform(0, 1))
                t = rng.uniform(0, 2 * math.pi)
                x, y = a.centre[0] + r * math.cos(t), a.centre[1] + r * math.sin(t)
            if quadrant is not None and _quadrant(a, x, y) != quadrant:
                continue
            if self._inside(x, y, margin_px) and self._off_disc(x, y):
                return x, y
        # fall back to the middle of the quadrant / the fovea
        if quadrant is not None:
            sx = -1 if "temporal" in quadrant else 1
            sy = -1 if quadrant.startswith("supero") else 1
            return a.centre[0] + sx * a.radius * 0.4, a.centre[1] + sy * a.radius * 0.4
        return a.fovea

    def vessel_point(self, near=None, max_dist=None, veins_only=False, min_width=0.0):
        """A vessel centre-line sample (x, y, dx, dy, width, vein), optionally near a point."""
        v = self.anat.vessels
        ok = np.ones(len(v), bool)
        if veins_only:
            ok &= v[:, 5] > 0.5
        ok &= v[:, 4] >= min_width
        a = self.anat
        ok &= (v[:, 0] - a.centre[0]) ** 2 + (v[:, 1] - a.centre[1]) ** 2 < (0.85 * a.radius) ** 2
        if near is not None:
            d = np.hypot(v[:, 0] - near[0], v[:, 1] - near[1])
            ok &= d < max_dist
        idx = np.nonzero(ok)[0]
        if len(idx) == 0:
            return None
        return v[self.rng.choice(idx)]

    def _record(self, kind, x, y, size_px, depth, cluster=-1):
        lo, hi = LESION_SIZE_UM[kind]
        size_um = size_px * self.anat.um_per_px
        assert lo - 1e-6 <= size_um <= hi + 1e-6, (kind, size_um)
        self.records.append(dict(kind=kind, x=float(x), y=float(y), size_px=float(size_px),
                                 size_um=float(size_um), quadrant=_quadrant(self.anat, x, y),
                                 depth=float(depth), cluster=int(cluster)))

    def _size_px(self, kind, log=True, lo=None, hi=None):
        klo, khi = LESION_SIZE_UM[kind]
        lo = klo if lo is None else max(lo, klo)
        hi = khi if hi is None else min(hi, khi)
        um = _log_uniform(self.rng, lo, hi) if log else self.rng.uniform(lo, hi)
        return self.anat.px(um)

    # -- kinds -----------------------------------------------------------------------------------------
    def microaneurysm(self, x=None, y=None, diameter_px=None, depth=None):
        """Round dark-red dot with a Gaussian profile; FWHM = diameter (calibrated, see MA_GREEN_DEPTH)."""
        if x is None:
            x, y = self.position("posterior")
        d = self._size_px("microaneurysm", lo=25, hi=125) if diameter_px is None else diameter_px
        depth = self.rng.uniform(*MA_GREEN_DEPTH) if depth is None else depth
        sigma = d / 2.3548
        x0, y0, w, h, f, X, Y = _patch(x, y, 3 * sigma)
        alpha = np.exp(-(X * X + Y * Y) / (2 * sigma * sigma)) * depth
        _multiply_patch(self.img, _integrate(alpha, w, h), x0, y0, _BLOOD_RGB)
        self._record("microaneurysm", x, y, d, depth)

    def dot_blot(self, x=None, y=None, quadrant=None):
        """Dot/blot haemorrhage: darker, irregular (union of lobes), slightly soft edge."""
        if x is None:
            x, y = self.position("anywhere" if quadrant else "posterior", quadrant)
        rng = self.rng
        lo, hi = LESION_SIZE_UM["dot_blot_haemorrhage"]
        d = self.anat.px(lo * (hi / lo) ** (rng.uniform(0, 1) ** 1.6))
        r = d / 2
        x0, y0, w, h, f, X, Y = _patch(x, y, r)
        field_ = np.full_like(X, -10.0)
        n_lobes = 1 if d < self.anat.px(250) else int(rng.integers(2, 6))
        for i in range(n_lobes):
            if i == 0:
                ox = oy = 0.0
                lr = r * (1.0 if n_lobes == 1 else rng.uniform(0.55, 0.8))
            else:
                t = rng.uniform(0, 2 * math.pi)
                lr = r * rng.uniform(0.3, 0.55)
                ox, oy = (r - lr) * math.cos(t), (r - lr) * math.sin(t)
            e = rng.uniform(0.75, 1.0)
            field_ = np.maximum(field_, 1 - np.sqrt(((X - ox) / lr) ** 2 + ((Y - oy) / (lr * e)) ** 2))
        edge = max(0.06, 0.6 / max(r, 1e-3))
        alpha = 1 / (1 + np.exp(-field_ / edge))
        depth = rng.uniform(0.55, 0.8)
        _multiply_patch(self.img, _integrate(alpha * depth, w, h), x0, y0, _BLOOD_RGB * [1.6, 1, 1])
        self._record("dot_blot_haemorrhage", x, y, d, depth)

    def flame(self, quadrant=None):
        """Flame haemorrhage: elongated, streaky, in the nerve-fibre layer beside a vessel."""
        rng, a = self.rng, self.anat
        v = None
        for _ in range(20):
            v = self.vessel_point(near=a.disc, max_dist=3.5 * a.disc_diameter)
            if v is not None and (quadrant is None or _quadrant(a, v[0], v[1]) == quadrant):
                break
            v = None
        if v is None:
            x, y = self.position("anywhere", quadrant)
            dx, dy = (x - a.disc[0]), (y - a.disc[1])
            n = math.hypot(dx, dy) + 1e-9
            v = np.array([x, y, dx / n, dy / n, 0, 0])
        length = self._size_px("flame_haemorrhage")
        width = length * rng.uniform(0.2, 0.35)
        nx, ny = -v[3], v[2]
        off = (v[4] / 2 + width / 2) * (1 if rng.random() < 0.5 else -1)
        x, y = float(v[0] + nx * off), float(v[1] + ny * off)
        if not self._inside(x, y, length / 2):
            x, y = self.position("anywhere", quadrant, margin_px=length / 2)
        x0, y0, w, h, f, X, Y = _patch(x, y, length / 2, min_sub=6)
        u = X * v[2] + Y * v[3]
        q = -X * v[3] + Y * v[2]
        taper = np.clip(1 - (u / (length / 2)) ** 2, 0, 1)
        # flame: blunt at the disc end, feathered and pointed at the far end, streaked along its length
        skew = np.clip(1 - (u / (length / 2) + 0.3) ** 2 / 1.69, 0, 1)
        body = np.clip(1 - (q / (width / 2 * (0.1 + 0.9 * skew) + 1e-6)) ** 2, 0, 1)
        streak = 0.8 + 0.2 * np.cos(q * 2 * math.pi / max(width / 3, 1e-3) + rng.uniform(0, 6))
        depth = rng.uniform(0.45, 0.7)
        alpha = taper * body * streak * depth
        _multiply_patch(self.img, _integrate(alpha, w, h), x0, y0, _BLOOD_RGB * [1.5, 1, 1])
        self._record("flame_haemorrhage", x, y, length, depth)

    def exudate_cluster(self):
        """Hard exudates: yellow-white, sharp-edged, in clumps or a circinate ring near the macula."""
        rng, a = self.rng, self.anat
        self._cluster += 1
        cid = self._cluster
        r = abs(rng.normal(0, 1.2 * a.disc_diameter))
        t = rng.uniform(0, 2 * math.pi)
        cx, cy = a.fovea[0] + r * math.cos(t), a.fovea[1] + r * math.sin(t)
        if not (self._inside(cx, cy, a.px(800)) and self._off_disc(cx, cy, 1.2)):
            cx, cy = a.fovea[0] + a.disc_diameter * 0.8, a.fovea[1] - a.disc_diameter * 0.5
        ring = rng.random() < 0.35
        n = int(rng.integers(8, 30) if ring else rng.integers(1, 12))
        ring_r = a.px(rng.uniform(400, 1500))
        colour = np.array([0.98, 0.92, 0.55], np.float32) * rng.uniform(0.9, 1.02)
        for i in range(n):
            if ring:
                t = 2 * math.pi * i / n + rng.normal(0, 0.15)
                rr = ring_r * rng.uniform(0.9, 1.1)
            else:
                t = rng.uniform(0, 2 * math.pi)
                rr = abs(rng.normal(0, a.px(350)))
            x, y = cx + rr * math.cos(t), cy + rr * math.sin(t)
            if not (self._inside(x, y, 0) and self._off_disc(x, y)):
                continue
            d = self._size_px("hard_exudate", lo=50, hi=300 if ring else 500)
            rad = d / 2
            x0, y0, w, h, f, X, Y = _patch(x, y, rad)
            e = rng.uniform(0.6, 1.0)
            th = rng.uniform(0, math.pi)
            u = X * math.cos(th) + Y * math.sin(th)
            q = -X * math.sin(th) + Y * math.cos(th)
            rho = np.sqrt((u / rad) ** 2 + (q / (rad * e)) ** 2)
            jag = 1 + 0.12 * np.sin(np.arctan2(q, u) * rng.integers(3, 7) + rng.uniform(0, 6))
            alpha = 1 / (1 + np.exp((rho - jag) / 0.06))  # sharp edge
            opacity = rng.uniform(0.6, 0.9)
            _blend_patch(self.img, _integrate(alpha * opacity, w, h), x0, y0, colour)
            self._record("hard_exudate", x, y, d, opacity, cid)

    def cotton_wool(self):
        """Cotton-wool spot: pale, fluffy, soft-edged, near the arcades / disc."""
        rng, a = self.rng, self.anat
        v = self.vessel_point(near=a.disc, max_dist=3.0 * a.disc_diameter)
        if v is not None:
            off = a.px(rng.uniform(150, 500)) * (1 if rng.random() < 0.5 else -1)
            x, y = float(v[0] - v[3] * off), float(v[1] + v[2] * off)
            dirx, diry = float(v[2]), float(v[3])
        else:
            x, y = self.position("posterior")
            dirx, diry = 1.0, 0.0
        d = self._size_px("cotton_wool_spot")
        if not (self._inside(x, y, d) and self._off_disc(x, y, 0.9)):
            x, y = self.position("posterior", margin_px=d)
        x0, y0, w, h, f, X, Y = _patch(x, y, d / 2, min_sub=6)
        u = X * dirx + Y * diry
        q = -X * diry + Y * dirx
        rho = np.sqrt((u / (d / 2)) ** 2 + (q / (d / 2 * rng.uniform(0.5, 0.8))) ** 2)
        fluff = _smooth_noise(rng, X.shape, 6) * 0.25
        alpha = np.clip(1 - rho + fluff, 0, 1) ** 0.7
        opacity = rng.uniform(0.45, 0.7)
        colour = np.array([0.93, 0.88, 0.80], np.float32)
        _blend_patch(self.img, _integrate(alpha * opacity, w, h), x0, y0, colour)
        self._record("cotton_wool_spot", x, y, d, opacity)

    def _draw_fine_vessels(self, paths, width_px, depth):
        """Draw thin new vessels (IRMA / NV) as tortuous polylines in a local supersampled patch."""
        allp = np.vstack(paths)
        xmin, ymin = np.floor(allp.min(0)).astype(int) - 3
        xmax, ymax = np.ceil(allp.max(0)).astype(int) + 3
        w, h = xmax - xmin + 1, ymax - ymin + 1
        f = int(min(8, max(2, math.ceil(3.0 / max(width_px, 1e-3)))))
        m = np.zeros((h * f, w * f), np.uint8)
        for p in paths:
            _polyline(m, p - [xmin, ymin] + 0.5, width_px, f)
        alpha = _integrate(m.astype(np.float32) / 255.0 * depth, w, h)
        _multiply_patch(self.img, alpha, int(xmin), int(ymin), _BLOOD_RGB * [1.5, 1, 1])

    def _tortuous(self, start, heading, length, step, wiggle):
        rng = self.rng
        pts = [np.array(start, float)]
        h = heading
        s = 0.0
        while s < length:
            h += rng.normal(0, wiggle)
            pts.append(pts[-1] + step * np.array([math.cos(h), math.sin(h)]))
            s += step
        return np.array(pts)

    def irma(self, quadrant=None):
        """IRMA: fine, tortuous, irregular intraretinal vessels near a vessel (calibre 15-30 um)."""
        rng, a = self.rng, self.anat
        x, y = self.position("anywhere", quadrant, margin_px=a.px(1200))
        extent = self._size_px("irma", lo=300, hi=1100, log=False)
        step = max(0.5, extent / 25)
        paths = []
        for _ in range(int(rng.integers(3, 7))):
            st = (x + rng.normal(0, extent / 6), y + rng.normal(0, extent / 6))
            paths.append(self._tortuous(st, rng.uniform(0, 2 * math.pi), extent * rng.uniform(0.3, 0.6), step, 0.6))
        allp = np.vstack(paths)
        allp = np.clip(allp, [x - extent / 2, y - extent / 2], [x + extent / 2, y + extent / 2])
        paths = [np.clip(p, [x - extent / 2, y - extent / 2], [x + extent / 2, y + extent / 2]) for p in paths]
        self._draw_fine_vessels(paths, a.px(rng.uniform(15, 30)), rng.uniform(0.25, 0.4))
        self._record("irma", x, y, extent, 0.45)

    def _walk_vessel(self, v, length, min_width):
        """Centre-line points from sample ``v`` following the vessel in both directions, up to ``length``."""
        vs = self.anat.vessels
        pts = [np.array(v[:2], float)]
        for sign in (1.0, -1.0):
            p = np.array(v[:2], float)
            d = np.array(v[2:4], float) * sign
            s = 0.0
            step = max(1.0, float(v[4]) * 0.7)
            while s < length / 2:
                q = p + d * step
                d2 = (vs[:, 0] - q[0]) ** 2 + (vs[:, 1] - q[1]) ** 2
                d2[vs[:, 4] < min_width] = np.inf
                j = int(np.argmin(d2))
                if d2[j] > (0.8 * step) ** 2 + 4:
                    break
                nxt = vs[j, :2].astype(float)
                nd = vs[j, 2:4].astype(float)
                if np.dot(nd, d) < 0:
                    nd = -nd
                if np.linalg.norm(nxt - p) < 0.3 * step:
                    break
                s += float(np.linalg.norm(nxt - p))
                p, d = nxt, nd
                if sign > 0:
                    pts.append(p)
                else:
                    pts.insert(0, p)
        pts = np.array(pts)
        total = float(np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1))) if len(pts) > 1 else 0.0
        return pts, total

    def venous_beading(self, quadrant):
        """Venous beading: a stretch of a vein with alternating dilatations and constrictions."""
        rng, a = self.rng, self.anat
        lo, hi = LESION_SIZE_UM["venous_beading"]
        want = a.px(rng.uniform(lo, hi))
        best = None
        for _ in range(30):
            v = self.vessel_point(veins_only=True, min_width=a.px(60))
            if v is None or _quadrant(a, v[0], v[1]) != quadrant:
                v = self.vessel_point(min_width=a.px(45))
            if v is None or _quadrant(a, v[0], v[1]) != quadrant:
                continue
            pts, total = self._walk_vessel(v, want, 0.6 * float(v[4]))
            if best is None or total > best[2]:
                best = (v, pts, total)
            if total >= a.px(lo):
                break
        if best is None or best[2] < a.px(lo):
            # no long enough vein in this quadrant: the beaded vein is drawn with it
            x, y = self.position("anywhere", quadrant, margin_px=want / 2)
            t = rng.uniform(0, 2 * math.pi)
            pts = self._tortuous((x, y), t, want, max(1.0, want / 30), 0.05)
            width = a.px(rng.uniform(100, 140))
            self._draw_fine_vessels([pts], width, 0.35)
            v = np.array([x, y, math.cos(t), math.sin(t), width, 1], np.float32)
            total = float(np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1)))
        else:
            v, pts, total = best
        width = max(float(v[4]), a.px(70))
        # beads: one every ~1.6 vein widths along the walked centre-line
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        cum = np.concatenate([[0.0], np.cumsum(seg)])
        for t in np.arange(width * 0.8, max(cum[-1], width), width * 1.6):
            bx = float(np.interp(t, cum, pts[:, 0]))
            by = float(np.interp(t, cum, pts[:, 1]))
            r = width * rng.uniform(0.7, 0.9)
            x0, y0, w, h, f, X, Y = _patch(bx, by, r)
            alpha = np.exp(-((X / r) ** 2 + (Y / r) ** 2) * 1.5) * rng.uniform(0.3, 0.45)
            _multiply_patch(self.img, _integrate(alpha, w, h), x0, y0, _BLOOD_RGB * [1.6, 1, 1])
        size = float(np.clip(total, a.px(lo), a.px(hi)))
        # recorded at the sample the walk started from, which lies in the requested quadrant
        self._record("venous_beading", float(v[0]), float(v[1]), size, 0.4)

    def neovascularisation(self, at_disc: bool):
        """NVD / NVE: a tuft of fine, looping, tortuous new vessels at the disc or along a vessel."""
        rng, a = self.rng, self.anat
        if at_disc:
            t = rng.uniform(0, 2 * math.pi)
            rr = a.disc_diameter * rng.uniform(0.0, 0.5)
            x, y = a.disc[0] + rr * math.cos(t), a.disc[1] + rr * math.sin(t)
            kind = "nvd"
        else:
            v = self.vessel_point(min_width=a.px(50))
            if v is not None:
                x, y = float(v[0]), float(v[1])
            else:
                x, y = self.position("anywhere")
            if not self._inside(x, y, a.px(1500)):
                x, y = self.position("anywhere", margin_px=a.px(1500))
            kind = "nve"
        extent = self._size_px(kind, lo=500, hi=2400, log=False)
        step = max(0.4, extent / 40)
        paths = []
        for _ in range(int(rng.integers(5, 12))):
            t = rng.uniform(0, 2 * math.pi)
            p = self._tortuous((x, y), t, extent * rng.uniform(0.3, 0.55), step, 0.45)
            # loops: come back towards the centre
            back = self._tortuous(p[-1], t + math.pi + rng.normal(0, 0.6), extent * 0.3, step, 0.45)
            paths.append(np.vstack([p, back]))
        paths = [np.clip(p, [x - extent / 2, y - extent / 2], [x + extent / 2, y + extent / 2]) for p in paths]
        self._draw_fine_vessels(paths, a.px(rng.uniform(15, 35)), rng.uniform(0.4, 0.6))
        if rng.random() < 0.5:  # fibrous veil around the tuft
            x0, y0, w, h, f, X, Y = _patch(x, y, extent / 2, min_sub=4)
            alpha = np.clip(1 - np.sqrt(X * X + Y * Y) / (extent / 2), 0, 1) * rng.uniform(0.1, 0.25)
            _blend_patch(self.img, _integrate(alpha, w, h), x0, y0, np.array([0.9, 0.85, 0.8], np.float32))
        self._record(kind, x, y, extent, 0.5)

    def preretinal(self):
        """Pre-retinal haemorrhage: a large dark-red area with a flat (fluid-level) upper border."""
        rng, a = self.rng, self.anat
        d = self._size_px("preretinal_haemorrhage", log=False)
        v = self.vessel_point(near=a.fovea, max_dist=2.5 * a.disc_diameter)
        x, y = (float(v[0]), float(v[1])) if v is not None else self.position("posterior")
        if not (self._inside(x, y, d / 2) and self._off_disc(x, y, 0.5)):
            x, y = self.position("posterior", margin_px=d / 2)
        x0, y0, w, h, f, X, Y = _patch(x, y, d / 2, min_sub=4)
        rho = np.sqrt((X / (d / 2)) ** 2 + (Y / (d / 2 * rng.uniform(0.6, 0.9))) ** 2)
        level = rng.uniform(-0.4, 0.0) * d / 2
        alpha = 1 / (1 + np.exp((rho - 1) / 0.04)) * (1 / (1 + np.exp((level - Y) / max(0.7, d / 200))))
        depth = rng.uniform(0.75, 0.92)
        _multiply_patch(self.img, _integrate(alpha * depth, w, h), x0, y0, _BLOOD_RGB * [2.2, 1, 1])
        self._record("preretinal_haemorrhage", x, y, d, depth)

    def vitreous(self):
        """Vitreous haemorrhage: a diffuse dark-red haze veiling part of the field."""
        rng, a = self.rng, self.anat
        d = self._size_px("vitreous_haemorrhage", log=False)
        x, y = self.position("anywhere", margin_px=0)
        H, W = self.img.shape[:2]
        step = max(1, int(d / 64))
        yy, xx = np.mgrid[0:H:step, 0:W:step].astype(np.float32)
        rho = np.sqrt((xx - x) ** 2 + (yy - y) ** 2) / (d / 2)
        noise = _smooth_noise(rng, rho.shape, 5)
        alpha = np.clip(1.2 - rho + 0.3 * noise, 0, 1) * rng.uniform(0.4, 0.65)
        alpha = cv2.resize(alpha, (W, H), interpolation=cv2.INTER_LINEAR)
        blurred = cv2.GaussianBlur(self.img, (0, 0), max(1.0, a.px(60)))
        a3 = alpha[..., None]
        self.img[:] = (self.img * (1 - a3) + blurred * a3) * (1 - a3 * _BLOOD_RGB * 0.6)
        self._record("vitreous_haemorrhage", x, y, d, float(alpha.max()))


def _draw_lesions(rng: np.random.Generator, img: np.ndarray, anat: Anatomy, grade: int) -> list[dict]:
    p = _LesionPainter(rng, img, anat)
    if grade == 0:
        return p.records
    if grade == 1:
        # few, tiny: the class the paper says needs resolution
        for _ in range(int(min(8, 1 + rng.geometric(0.45)))):
            p.microaneurysm()
        return p.records
    n_ma = int(rng.integers(2, 12) if grade == 2 else rng.integers(8, 30))
    for _ in range(n_ma):
        p.microaneurysm()
    if grade == 2:
        signs = [s for s in ("haem", "exudate", "cws", "flame") if rng.random() < 0.5] or ["haem"]
        if "haem" in signs:
            for _ in range(int(rng.integers(1, 15))):
                p.dot_blot()
        if "flame" in signs:
            for _ in range(int(rng.integers(1, 4))):
                p.flame()
        if "exudate" in signs:
            for _ in range(int(rng.integers(1, 3))):
                p.exudate_cluster()
        if "cws" in signs:
            for _ in range(int(rng.integers(1, 4))):
                p.cotton_wool()
        return p.records
    # grades 3 and 4: severe non-proliferative background
    rules = [r for r in ("haem421", "beading", "irma") if rng.random() < 0.45]
    if grade == 3 and not rules:
        rules = [("haem421", "beading", "irma")[int(rng.integers(3))]]
    if "haem421" in rules:
        for q in QUADRANTS:
            for _ in range(int(rng.integers(21, 30))):
                if rng.random() < 0.85:
                    p.dot_blot(quadrant=q)
                else:
                    p.flame(quadrant=q)
    else:
        for _ in range(int(rng.integers(3, 25))):
            p.dot_blot()
    if "beading" in rules:
        for q in rng.permutation(QUADRANTS)[: int(rng.integers(2, 5))]:
            p.venous_beading(str(q))
    if "irma" in rules:
        for q in rng.permutation(QUADRANTS)[: int(rng.integers(1, 3))]:
            p.irma(str(q))
    for _ in range(int(rng.integers(0, 3))):
        p.exudate_cluster()
    for _ in range(int(rng.integers(0, 5))):
        p.cotton_wool()
    if grade == 4:
        signs = [s for s in ("nvd", "nve", "preretinal", "vitreous") if rng.random() < 0.4] or ["nvd"]
        if "nvd" in signs:
            p.neovascularisation(at_disc=True)
        if "nve" in signs:
            for _ in range(int(rng.integers(1, 3))):
                p.neovascularisation(at_disc=False)
        if "preretinal" in signs:
            p.preretinal()
        if "vitreous" in signs:
            p.vitreous()
    return p.records


# --------------------------------------------------------------------------------------------------------
# Camera: vignetting, illumination, framing, noise, JPEG
# --------------------------------------------------------------------------------------------------------

def _camera(rng: np.random.Generator, img: np.ndarray, anat: Anatomy) -> np.ndarray:
    S = anat.size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    r = np.sqrt((xx - anat.centre[0]) ** 2 + (yy - anat.centre[1]) ** 2) / anat.radius
    vig = 1.0 - rng.uniform(0.15, 0.4) * r ** rng.uniform(2.0, 4.0)
    t = rng.uniform(0, 2 * math.pi)
    ramp = 1.0 + rng.uniform(0.0, 0.18) * ((xx - anat.centre[0]) * math.cos(t)
                                           + (yy - anat.centre[1]) * math.sin(t)) / anat.radius
    img = img * (vig * ramp * rng.uniform(0.85, 1.15))[..., None]
    # field stop: soft circular edge, black outside
    edge = np.clip((anat.radius - 0.5 - r * anat.radius) / max(1.0, S / 512) + 0.5, 0, 1)
    return img * edge[..., None]


def _finish(rng, img: np.ndarray) -> np.ndarray:
    """Camera noise, then 8-bit RGB."""
    sigma = rng.uniform(0.004, 0.012)
    noise = rng.standard_normal(img.shape[:2], dtype=np.float32) * sigma
    img = img + noise[..., None] * np.array([1.0, 0.8, 0.9], np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _frame_eyepacs(rng, img: np.ndarray, records: list[dict], anat_meta: dict) -> np.ndarray:
    """Place the fundus on a wider-than-tall canvas, off-centre; some photos darker, blurrier, notched."""
    S = img.shape[0]
    W = int(round(S * rng.uniform(1.4, 1.55)))
    H = S
    off = int(round(rng.uniform(-0.06, 0.06) * S))
    x0 = (W - S) // 2 + off
    canvas = np.zeros((H, W, 3), img.dtype)
    canvas[:, x0:x0 + S] = img
    if rng.random() < 0.3:  # darker
        canvas = np.clip(canvas * rng.uniform(0.45, 0.8) + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.25:  # blurrier (defocus)
        canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.5, 2.0) * S / 1024)
    if rng.random() < 0.4:  # notch at the field edge, as fundus cameras mark it
        t = rng.choice([-0.25, 0.25, 0.75, 1.25]) * math.pi + rng.normal(0, 0.05)
        cx, cy = x0 + (S - 1) / 2 + 0.5 * S * math.cos(t), (S - 1) / 2 + 0.5 * S * math.sin(t)
        half = S * 0.025
        pts = np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half],
                        [cx - half, cy + half]], np.float32)
        cv2.fillConvexPoly(canvas, pts.astype(np.int32), (0, 0, 0))
    for rec in records:
        rec["x"] += x0
    for k in ("field_x", "disc_x", "fovea_x"):
        anat_meta[k] += x0
    anat_meta["width"] = W
    return canvas


def render_fundus(
    rng_or_seed,
    grade: int,
    size: int = 1024,
    eye: str = "right",
    background: str = "procedural",
    framing: str | None = None,
    return_meta: bool = False,
):
    """Draw one synthetic fundus photograph of a given DR grade.

    Args:
        rng_or_seed: a ``numpy.random.Generator`` or an integer seed.
        grade: International Clinical DR grade, 0-4; the lesions drawn satisfy the clinical rules of that
            grade (:func:`grade_from_lesions` of the records returns ``grade``).
        size: diameter of the fundus disc in pixels (64-4096); the field is 12 mm across.
        eye: ``"right"`` (disc on the right of the image) or ``"left"`` (mirror geometry).
        background: ``"procedural"`` or ``"real"`` (``skimage.data.retina()`` under random variation).
        framing: ``None`` (square photo, the fundus disc fills it) or ``"eyepacs"`` (wider-than-tall canvas,
            off-centre fundus, some photos darker, blurrier or notched).
        return_meta: also return a dict with the anatomy (disc, fovea, field centre, scale).

    Returns:
        ``(image, lesions)``: an ``(H, W, 3)`` uint8 RGB array and a list of dicts with keys
        ``kind, x, y, size_px, size_um, quadrant, depth, cluster`` (pixel coordinates in the returned image);
        with ``return_meta`` a third item, the anatomy dict.

    Example:

    >>> img, lesions = render_fundus(3, grade=4, size=128)
    >>> grade_from_lesions(lesions)
    4
    """
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(int(rng_or_seed))
    size = validate_size(size)
    if grade not in GRADES:
        raise UserError(f"grade {grade!r} is invalid; accepted: 0, 1, 2, 3, 4")
    if eye not in ("left", "right"):
        raise UserError(f"eye {eye!r} is invalid; accepted: left, right")
    if background not in ("procedural", "real"):
        raise UserError(f"background {background!r} is invalid; accepted: procedural, real")
    if framing not in (None, "none", "eyepacs"):
        raise UserError(f"framing {framing!r} is invalid; accepted: none, eyepacs")
    if background == "real":
        img, anat = _real_background(rng, size)
    else:
        img, anat = _procedural_background(rng, size)
    with np.errstate(over="ignore"):  # logistic edges: exp overflows to inf far outside, giving alpha 0
        records = _draw_lesions(rng, img, anat, grade)
    img = _camera(rng, img, anat)
    meta = dict(width=size, height=size, field_diameter_px=size, um_per_px=anat.um_per_px,
                field_x=anat.centre[0], field_y=anat.centre[1], disc_x=anat.disc[0], disc_y=anat.disc[1],
                disc_diameter_px=anat.disc_diameter, fovea_x=anat.fovea[0], fovea_y=anat.fovea[1])
    if eye == "left":
        img = img[:, ::-1]
        for rec in records:
            rec["x"] = size - 1 - rec["x"]
        for k in ("field_x", "disc_x", "fovea_x"):
            meta[k] = size - 1 - meta[k]
    out = _finish(rng, np.ascontiguousarray(img))
    if framing == "eyepacs":
        out = _frame_eyepacs(rng, out, records, meta)
    if return_meta:
        return out, records, meta
    return out, records


# --------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------

def measure_dark_spot(gray: np.ndarray, x: float, y: float, half: int = 7) -> dict:
    """Fit ``plane - A * gaussian`` to a dark spot in a grey image and report its contrast and profile.

    Args:
        gray: 2-D array (e.g. the green channel).
        x, y: approximate centre of the spot; the window is ``2 * half + 1`` pixels wide.

    Returns:
        dict with ``depth`` (A / local background, the relative darkening at the centre), ``fwhm`` (px),
        ``residual`` (RMS fit residual / A: 0 for a perfect Gaussian profile), ``profile`` (mean relative
        darkening at radii 0, 0.5, ..., 2.5 FWHM, normalised to 1 at the centre) and ``background``.
    """
    from scipy.optimize import least_squares

    g = np.asarray(gray, np.float64)
    xi, yi = int(round(x)), int(round(y))
    win = g[yi - half:yi + half + 1, xi - half:xi + half + 1]
    hgt, wid = win.shape
    yy, xx = np.mgrid[0:hgt, 0:wid]
    c = (hgt - 1) / 2

    def model(p):
        b0, bx, by, A, s, x0, y0 = p
        return b0 + bx * (xx - c) + by * (yy - c) - A * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))

    p0 = [np.median(win), 0, 0, max(np.median(win) - win.min(), 1e-3), 1.5, c, c]
    fit = least_squares(lambda p: (model(p) - win).ravel(), p0,
                        bounds=([-np.inf, -np.inf, -np.inf, 0, 0.3, 0, 0],
                                [np.inf, np.inf, np.inf, np.inf, half, hgt - 1, wid - 1]))
    b0, bx, by, A, s, x0, y0 = fit.x
    bg = b0 + bx * (x0 - c) + by * (y0 - c)
    plane = b0 + bx * (xx - c) + by * (yy - c)
    rel = (plane - win) / plane
    fwhm = 2.3548 * s
    r = np.sqrt((xx - x0) ** 2 + (yy - y0) ** 2) / fwhm
    prof = []
    for k in np.arange(0, 2.51, 0.5):
        sel = np.abs(r - k) <= 0.25
        prof.append(float(rel[sel].mean()) if sel.any() else float("nan"))
    prof = np.array(prof) / (A / bg)
    return dict(depth=float(A / bg), fwhm=float(fwhm), residual=float(np.sqrt(np.mean(fit.fun ** 2)) / A),
                profile=prof, background=float(bg))


def reference_microaneurysms() -> list[dict]:
    """:func:`measure_dark_spot` of the two microaneurysms in ``skimage.data.microaneurysms()``."""
    from skimage import data as skdata

    gray = skdata.microaneurysms()
    return [measure_dark_spot(gray, x, y) for x, y in MA_CENTRES_IN_REFERENCE]


# --------------------------------------------------------------------------------------------------------
# Data set on disk
# --------------------------------------------------------------------------------------------------------

_PHOTO_NAME = re.compile(r"^\d+_(left|right)\.jpeg(\.tmp)?$")


def _render_one(job):
    spec, size, framing, quality_seed = job
    rng = np.random.default_rng(spec.seed)
    img, records, meta = render_fundus(rng, spec.true_level, size=size, eye=spec.eye,
                                       background=spec.background, framing=framing, return_meta=True)
    quality = int(rng.integers(85, 96))
    ok, buf = cv2.imencode(".jpeg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"JPEG encoding failed for {spec.name}")
    meta["height"] = img.shape[0]
    meta["width"] = img.shape[1]
    return spec, buf.tobytes(), records, meta


def _worker_init():
    cv2.setNumThreads(1)


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"output path {out_dir} exists and is not a folder")
        if os.listdir(out_dir) and not overwrite:
            raise FileExistsError(
                f"output folder {out_dir} is not empty; choose an empty or new folder, or pass --overwrite"
            )


def _atomic_csv(path: str, columns: Sequence[str], rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_fmt(row[c]) for c in columns])


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 1 or v == 0 else f"{v:.4f}"
    return v


def generate_dataset(
    out_dir: str,
    count: int,
    size: int = 1024,
    seed: int = 0,
    prior: str | Sequence[float] = "eyepacs",
    label_noise: float = 0.0,
    workers: int = 1,
    framing: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    real_fraction: float = 0.3,
) -> dict:
    """Write a synthetic data set in the EyePACS (Kaggle 2015) layout.

    ``out_dir/train/<patient>_<left|right>.jpeg``, ``out_dir/lesions.csv`` (one row per lesion drawn),
    ``out_dir/images.csv`` (one row per photo: eye, true and written grade, background, anatomy) and, last and
    atomically, ``out_dir/trainLabels.csv`` (``image,level``). The same arguments give byte-identical files
    whatever ``workers`` is.

    Args:
        out_dir: output folder; must be new or empty unless ``overwrite``.
        count: number of photos.
        size: fundus diameter in pixels (64-4096).
        seed: master seed.
        prior: ``eyepacs`` (paper's Table II), ``balanced`` or five fractions.
        label_noise: probability that the written label moves to an adjacent grade.
        workers: processes drawing photos in parallel.
        framing: ``None`` or ``"eyepacs"`` (see :func:`render_fundus`).
        overwrite: allow a non-empty ``out_dir`` (the files this function writes are replaced).
        progress: show a tqdm progress bar.
        real_fraction: fraction of photos on the real ``skimage`` background.

    Returns:
        A summary dict: count, size, seed, prior, label counts, lesion counts by kind, paths.

    Example:

    >>> import tempfile
    >>> summary = generate_dataset(tempfile.mkdtemp(), count=4, size=96, progress=False)
    >>> summary["count"]
    4
    """
    count = validate_count(count)
    size = validate_size(size)
    probs = parse_prior(prior)
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise UserError(f"workers {workers} is invalid; it must be a whole number >= 1")
    if framing not in (None, "none", "eyepacs"):
        raise UserError(f"framing {framing!r} is invalid; accepted: none, eyepacs")
    if not 0.0 <= float(real_fraction) <= 1.0:
        raise UserError(f"real fraction {real_fraction} is outside [0, 1]")
    out_dir = str(out_dir)
    _check_out_dir(out_dir, overwrite)
    specs = plan_dataset(count, seed=seed, prior=probs, label_noise=label_noise, real_fraction=real_fraction)

    train = os.path.join(out_dir, "train")
    labels_path = os.path.join(out_dir, "trainLabels.csv")
    os.makedirs(train, exist_ok=True)
    if os.path.exists(labels_path):  # overwriting: never leave stale labels beside new photos
        os.unlink(labels_path)

    from tqdm import tqdm

    jobs = [(s, size, framing, 0) for s in specs]
    lesion_rows: list[dict] = []
    image_rows: list[dict] = []
    bar = tqdm(total=count, desc="synth", unit="img", disable=not progress)
    if workers == 1 or count <= 1:
        results = map(_render_one, jobs)
        pool = None
    else:
        import multiprocessing as mp

        # spawn, not fork: forking a process whose OpenCV / BLAS thread pools are running can deadlock
        pool = mp.get_context("spawn").Pool(min(int(workers), count), _worker_init)
        results = pool.imap(_render_one, jobs, chunksize=1)
    try:
        for spec, data, records, meta in results:
            path = os.path.join(train, spec.name + ".jpeg")
            tmp = path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
            for rec in records:
                lesion_rows.append(dict(image=spec.name, **rec))
            image_rows.append(dict(image=spec.name, patient=spec.patient, eye=spec.eye, level=spec.level,
                                   true_level=spec.true_level, background=spec.background, seed=spec.seed,
                                   **meta))
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    # overwriting a larger, older set: drop its photos that this set does not have (only names this
    # generator writes), so train/ and trainLabels.csv agree
    wanted = {s.name + ".jpeg" for s in specs}
    for name in os.listdir(train):
        if name not in wanted and _PHOTO_NAME.match(name):
            os.unlink(os.path.join(train, name))
    _atomic_csv(os.path.join(out_dir, "lesions.csv"), LESION_COLUMNS, lesion_rows)
    _atomic_csv(os.path.join(out_dir, "images.csv"), IMAGE_COLUMNS, image_rows)
    levels = np.bincount([s.level for s in specs], minlength=5).tolist()
    kinds: dict[str, int] = {}
    for r in lesion_rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    summary = dict(out_dir=out_dir, count=count, size=size, seed=int(seed), prior=[float(p) for p in probs],
                   label_noise=float(label_noise), framing=framing, real_fraction=float(real_fraction),
                   levels=levels, lesions=kinds, labels=labels_path,
                   lesions_csv=os.path.join(out_dir, "lesions.csv"))
    _atomic_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    # the labels go last: a folder with trainLabels.csv is complete
    _atomic_csv(labels_path, ("image", "level"), ({"image": s.name, "level": s.level} for s in specs))
    return summary


def _atomic_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)
