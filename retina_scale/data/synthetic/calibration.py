"""Calibration of the microaneurysms against a real detail: :func:`measure_dark_spot` fits a Gaussian dip to a
dark spot; :func:`reference_microaneurysms` measures the two microaneurysms of ``skimage.data.microaneurysms()``
(whose range :data:`~retina_scale.data.synthetic.lesions.MA_GREEN_DEPTH` records)."""

from __future__ import annotations

import numpy as np

MA_CENTRES_IN_REFERENCE = ((16, 23), (48, 71))
"""(x, y) of the two microaneurysms in ``skimage.data.microaneurysms()``."""


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
