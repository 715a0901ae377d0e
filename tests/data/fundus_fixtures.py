"""Helpers of the data tests: fundus-like photos drawn with OpenCV, written as JPEG/PNG, and CSV files."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np


def draw_fundus(width=320, height=240, cx=None, cy=None, r=None, seed=0, brightness=1.0, notch=False):
    """A BGR photo: black frame, an orange disc with a few dark vessels and a pale optic disc."""
    rng = np.random.default_rng(seed)
    cx = width / 2 if cx is None else cx
    cy = height / 2 if cy is None else cy
    r = min(width, height) * 0.45 if r is None else r
    img = np.zeros((height, width, 3), np.uint8)
    base = np.array([40, 90, 200]) * brightness
    cv2.circle(img, (int(round(cx)), int(round(cy))), int(round(r)), [int(v) for v in base], -1, lineType=cv2.LINE_AA)
    for _ in range(6):
        a = rng.uniform(0, 2 * np.pi)
        p2 = (int(cx + 0.9 * r * np.cos(a)), int(cy + 0.9 * r * np.sin(a)))
        cv2.line(img, (int(cx - 0.3 * r), int(cy)), p2, [int(v) for v in base * 0.6], max(1, int(r / 60)))
    cv2.circle(img, (int(cx - 0.3 * r), int(cy)), max(2, int(r / 8)), [int(v) for v in np.minimum(base * 1.25, 255)], -1)
    if notch:
        # A square notch cut into the rim, as on many EyePACS photos.
        s = max(3, int(r / 10))
        x0, y0 = int(cx + r * 0.707 - s), int(cy - r * 0.707 - s // 2)
        img[y0 : y0 + s, x0 : x0 + 2 * s] = 0
    noise = rng.normal(0, 2, img.shape)
    return np.clip(img + noise * (img > 0), 0, 255).astype(np.uint8)


def write_jpeg(path, img, quality=90):
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    Path(path).write_bytes(buf.tobytes())


def write_png(path, img):
    ok, buf = cv2.imencode(".png", img)
    assert ok
    Path(path).write_bytes(buf.tobytes())


def write_csv(path, header, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


