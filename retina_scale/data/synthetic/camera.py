"""The fundus camera: vignetting, an illumination gradient and the field stop, sensor noise and 8 bits, the
EyePACS framing (a wide canvas, some photos darker, blurrier or notched) and the JPEG file."""

from __future__ import annotations

import math

import cv2
import numpy as np

from retina_scale.data.synthetic.anatomy import Anatomy


def apply_optics(rng: np.random.Generator, img: np.ndarray, anat: Anatomy) -> np.ndarray:
    """Vignetting, an illumination gradient across the field and the field stop (black outside the disc)."""
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


def add_sensor_noise(rng, img: np.ndarray) -> np.ndarray:
    """Camera noise, then 8-bit RGB."""
    sigma = rng.uniform(0.004, 0.012)
    noise = rng.standard_normal(img.shape[:2], dtype=np.float32) * sigma
    img = img + noise[..., None] * np.array([1.0, 0.8, 0.9], np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def frame_eyepacs(rng, img: np.ndarray, records: list[dict], anat_meta: dict) -> np.ndarray:
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


def encode_jpeg(rng: np.random.Generator, img: np.ndarray, name: str = "photo") -> bytes:
    """The JPEG file of an RGB photo, at a quality drawn from 85-95 as cameras and archives vary."""
    quality = int(rng.integers(85, 96))
    ok, buf = cv2.imencode(".jpeg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover
        raise RuntimeError(f"JPEG encoding failed for {name}")
    return buf.tobytes()
