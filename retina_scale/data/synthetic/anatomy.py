"""The retina behind the lesions: the two backgrounds (a drawn fundus, or scikit-image's real photo under
random variation) and where the disc, the fovea and the vessels lie (:class:`Anatomy`).

Geometry: drawn in the frame of a right eye (disc on the right of the image), mirrored later for left eyes.
``size`` is the diameter of the fundus disc in pixels; the 45-degree field is taken as :data:`FIELD_MM` across.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from retina_scale.data.synthetic.drawing import polyline, smooth_noise

FIELD_MM = 12.0
"""Diameter of the 45-degree fundus field, in millimetres."""


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


def quadrant_of(anat: Anatomy, x: float, y: float) -> str:
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


def procedural_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, Anatomy]:
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
    tex = (0.02 * smooth_noise(rng, (S, S), 8) + 0.015 * smooth_noise(rng, (S, S), 40)
           + 0.012 * smooth_noise(rng, (S, S), 120))
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
            polyline(masks[vein], pts[i:j] + 0.5, float(np.mean(widths[i:j])), ss)
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


def real_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, Anatomy]:
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
