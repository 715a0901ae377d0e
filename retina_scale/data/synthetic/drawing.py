"""Small drawing helpers shared by the anatomy and the lesions: smooth noise, supersampled patches integrated
over each pixel, and anti-aliased polylines."""

from __future__ import annotations

import math

import cv2
import numpy as np


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise: a coarse random grid upsampled bicubically."""
    h, w = shape
    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = cv2.resize(grid, (w + 2 * w // cells, h + 2 * h // cells), interpolation=cv2.INTER_CUBIC)
    oy, ox = h // cells, w // cells
    out = big[oy:oy + h, ox:ox + w]
    return (out - out.mean()) / (out.std() + 1e-6)


def clip_patch(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int):
    """``(region of img, matching alpha[..., None])`` for a patch placed at (x0, y0), clipped to the
    image; None when the patch falls outside it."""
    h, w = alpha.shape
    H, W = img.shape[:2]
    ax0, ay0 = max(0, -x0), max(0, -y0)
    ax1, ay1 = min(w, W - x0), min(h, H - y0)
    if ax1 <= ax0 or ay1 <= ay0:
        return None
    return img[y0 + ay0:y0 + ay1, x0 + ax0:x0 + ax1], alpha[ay0:ay1, ax0:ax1, None]


def multiply_patch(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, factors: np.ndarray) -> None:
    """img[y0:, x0:] *= 1 - alpha * factors, clipped to the image."""
    clipped = clip_patch(img, alpha, x0, y0)
    if clipped is not None:
        region, a = clipped
        region *= 1.0 - a * factors[None, None, :]


def blend_patch(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, colour: np.ndarray) -> None:
    """img[y0:, x0:] = (1 - alpha) img + alpha colour, clipped to the image."""
    clipped = clip_patch(img, alpha, x0, y0)
    if clipped is not None:
        region, a = clipped
        region *= 1.0 - a
        region += a * colour[None, None, :]


def patch_grid(cx: float, cy: float, radius_px: float, min_sub: float = 12.0):
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


def integrate(alpha_fine: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.resize(alpha_fine.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)


def polyline(img_mask: np.ndarray, pts: np.ndarray, thickness: float, scale: int = 1) -> None:
    """Anti-aliased polyline with sub-pixel vertices on a uint8 mask."""
    shift = 4
    p = np.round(pts * scale * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(img_mask, [p], False, 255, max(1, int(round(thickness * scale))), cv2.LINE_AA, shift)
