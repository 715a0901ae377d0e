"""OpenCV preprocessing of fundus photographs: check, decode fast, find the disc, crop, resize, normalise.

One call, :func:`preprocess_file`, turns a photo into one uint8 RGB square per requested size:

0. :func:`read_image_file` reads only a regular file (not a FIFO, a device or a link to one), and at most
   :func:`file_size_limit` bytes.
1. :func:`probe` reads the file's header (no decoding) and refuses what cannot be a colour fundus photo: an
   empty file, a truncated JPEG/PNG, a grayscale, CMYK or 16-bit image, one too small to hold a fundus, or
   one with more pixels than ``max_pixels`` (a decompression bomb). The content decides the format, not
   the file name (a PNG named ``.jpeg`` is read as the PNG it is), as in the serving graph, which gets no
   file name. Each refusal is a :class:`BadImage` with a one-line reason.
2. :func:`decode` decodes at 1/2, 1/4 or 1/8 of the resolution (``cv2.IMREAD_REDUCED_COLOR_*``, which for
   JPEG skips most of the inverse DCT work) whenever the largest requested size still fits in the result.
   The pixels are taken as stored: EXIF orientation is ignored, as TensorFlow's decoders (and so the
   serving graph) ignore it. A JPEG whose image data stops before its end marker (a cut file with
   ``FF D9`` appended: libjpeg fills the rest with grey and only warns) is refused (:func:`jpeg_suspect`,
   :func:`jpeg_truncated`).
3. :func:`find_disc` finds the fundus disc: threshold relative to the photo's own dark and bright levels (so
   dark photos work), keep the largest blob, fit a circle to its outline by least squares while dropping
   points on the image border (discs cut at the top and bottom) and outliers (notches, tabs).
4. :func:`crop_square` crops the disc's bounding square (padding with black where it leaves the photo), then
   each size is made with area interpolation (``cv2.INTER_AREA``), from the largest down.
5. Optionally :func:`graham_normalize` (B. Graham, Kaggle 2015: ``4*img - 4*GaussianBlur(sigma=r/30) + 128``,
   grey outside 90 % of the radius) and/or :func:`circular_mask` (black outside the disc).

Example:

```python
from retina_scale.config import PreprocessConfig
from retina_scale.data.fundus import preprocess_file
out = preprocess_file("10_left.jpeg", sizes=(112, 224), config=PreprocessConfig())
out.images[224].shape   # (224, 224, 3), uint8 RGB
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import struct

import cv2
import numpy as np

from retina_scale.config import MAX_PIXELS, PreprocessConfig
from retina_scale.utils.errors import UserError


class BadImage(UserError):
    """The file cannot be used; ``str(exc)`` is the one-line reason written to ``failures.csv``."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the header says: container format, size, colour channels and bits per channel."""

    format: str
    width: int
    height: int
    channels: int
    bit_depth: int


@dataclasses.dataclass(frozen=True)
class Disc:
    """The fundus disc in pixel coordinates of the full-resolution photo."""

    cx: float
    cy: float
    r: float


@dataclasses.dataclass
class Preprocessed:
    """Result of :func:`preprocess_file`: ``images[size]`` (uint8 RGB), the disc and the header info."""

    images: dict[int, np.ndarray]
    disc: Disc
    info: ImageInfo
    reduction: int


# ------------------------------------------------------------------------------------------------ read

def file_size_limit(max_pixels: int = MAX_PIXELS) -> int:
    """The largest file accepted for a pixel limit: 4 bytes per pixel plus 16 MiB of metadata.

    An 8-bit RGB photo under the limit needs at most 3 bytes per pixel as PNG (deflate stores what it
    cannot compress) and less as JPEG, so every usable photo fits; a bigger file is not one.

    >>> file_size_limit(40_000_000)
    176777216
    """
    return 4 * int(max_pixels) + (16 << 20)


def read_image_file(path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (or a link to one) of at most ``max_bytes``.

    The file is opened non-blocking, so a FIFO does not hang the caller, and checked with ``fstat`` on the
    open descriptor (no race between the check and the read); a device (``/dev/zero``), FIFO, socket or
    folder is refused, and so is a file over ``max_bytes``, before anything is read.

    Raises:
        BadImage: not a regular file, or too large.
        FileNotFoundError, OSError: the file is missing or unreadable.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("FIFO" if stat.S_ISFIFO(st.st_mode) else "device" if stat.S_ISCHR(st.st_mode) or
                    stat.S_ISBLK(st.st_mode) else "folder" if stat.S_ISDIR(st.st_mode) else "socket or other")
            raise BadImage(f"not a regular file ({kind}); only regular files are read")
        if st.st_size > max_bytes:
            raise BadImage(f"file too large ({st.st_size} bytes; the limit is {max_bytes}, from max_pixels)")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew while being read
        raise BadImage(f"file too large (over {max_bytes} bytes, the limit from max_pixels)")
    return data


# ----------------------------------------------------------------------------------------------- probe

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:2] == b"BM":
        return "BMP"
    return None


def _probe_jpeg(data: bytes) -> ImageInfo:
    tail = data[-64:].rstrip(b"\x00\r\n ")
    if not tail.endswith(b"\xff\xd9"):
        raise BadImage("truncated JPEG (no end-of-image marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 10 > n:
                break
            precision, height, width, comps = struct.unpack(">BHHB", data[i + 4 : i + 10])
            return ImageInfo("JPEG", width, height, comps, precision)
        if marker == 0xDA:  # start of scan before any frame header
            break
        i += 2 + length
    raise BadImage("corrupt JPEG (no frame header)")


def _probe_png(data: bytes) -> ImageInfo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadImage("corrupt PNG (no IHDR header)")
    width, height, depth, color_type = struct.unpack(">IIBB", data[16:26])
    if b"IEND" not in data[-32:]:
        raise BadImage("truncated PNG (no IEND chunk)")
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(color_type, 0)
    return ImageInfo("PNG", width, height, channels, depth)


def _tiff_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first IFD of a TIFF (tags 256 and 257), without decoding."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
        size = {}
        for i in range(min(count, 4096)):
            entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, kind = struct.unpack(order + "HH", entry[:4])
            if tag in (256, 257):
                size[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), entry[8 : 10 if kind == 3 else 12])[0]
        return size[256], size[257]
    except (struct.error, KeyError):
        raise BadImage("corrupt TIFF (no image size in its first directory)") from None


def _header_size(fmt: str, data: bytes) -> tuple[int, int]:
    """(width, height) of a TIFF or BMP from its header."""
    if fmt == "TIFF":
        return _tiff_size(data)
    if len(data) < 26:
        raise BadImage("corrupt BMP (header cut short)")
    if struct.unpack("<I", data[14:18])[0] == 12:  # the old OS/2 header: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse an image of more than ``max_pixels`` pixels (its header's size), before it is decoded."""
    if width * height > max_pixels:
        raise BadImage(f"image too large ({width}x{height} = {width * height / 1e6:.1f} Mpx; "
                       f"the limit is {max_pixels / 1e6:g} Mpx, max_pixels)")


def probe(data: bytes, name: str = "", max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Check a file's bytes without decoding the pixels (a TIFF or BMP is decoded only once its header's
    size is known to be under ``max_pixels``). The content decides the format; ``name`` is not used.

    Raises:
        BadImage: with the reason (empty, truncated, grayscale, CMYK, 16-bit, too small, too large).
    """
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    fmt = _sniff(data)
    if fmt is None:
        raise BadImage("not an image (unknown file signature; accepted: JPEG, PNG, TIFF, BMP)")
    if fmt == "JPEG":
        info = _probe_jpeg(data)
    elif fmt == "PNG":
        info = _probe_png(data)
    else:
        check_pixels(*_header_size(fmt, data), max_pixels)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # as stored: no EXIF rotation
        if img is None:
            raise BadImage(f"corrupt {fmt} (OpenCV cannot decode it)")
        channels = 1 if img.ndim == 2 else img.shape[2]
        info = ImageInfo(fmt, img.shape[1], img.shape[0], channels, 8 * img.dtype.itemsize)
    if info.channels in (1, 2):
        raise BadImage(f"grayscale image ({info.channels} channel{'s' if info.channels > 1 else ''}); colour fundus photos needed")
    if info.channels == 4 and info.format == "JPEG":
        raise BadImage("CMYK JPEG (4 colour components); convert it to RGB")
    if info.channels not in (3, 4):
        raise BadImage(f"unsupported colour layout ({info.channels} channels)")
    if info.bit_depth != 8:
        raise BadImage(f"{info.bit_depth}-bit image (8 bits per channel expected)")
    if min(info.width, info.height) < 1:
        raise BadImage("image has no pixels")
    check_pixels(info.width, info.height, max_pixels)
    return info


# ---------------------------------------------------------------------------------------------- decode

_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def choose_reduction(info: ImageInfo, largest_size: int, allowed: bool = True) -> int:
    """Largest factor k in 8, 4, 2, 1 such that the photo's short side / k still covers ``largest_size``."""
    if not allowed:
        return 1
    short = min(info.width, info.height)
    for k in (8, 4, 2):
        if short // k >= largest_size:
            return k
    return 1


def refine_reduction(k: int, r: float, largest_size: int) -> int:
    """The reduction to decode again with when the disc found at reduction ``k`` (radius ``r`` there) is too
    small for ``largest_size``: halve ``k`` until the disc's diameter covers it (or ``k`` is 1).

    >>> refine_reduction(8, 100.0, 448)
    2
    """
    while k > 1 and 2 * r < largest_size:
        k //= 2
        r *= 2
    return k


# Bytes put before a JPEG's last end marker by jpeg_truncated: anything but 0xFF that decodes to varied values
# (the serving graph has its own copy).
_JPEG_PROBE = hashlib.shake_256(b"retina_scale: is this JPEG cut short?").digest(64).replace(b"\xff", b"\x7f")
TRUNCATED_JPEG = "truncated JPEG (its image data stops before the last row; the rest would be grey)"


def jpeg_suspect(data: bytes, img: np.ndarray) -> bool:
    """Whether a decoded JPEG may be cut short, so :func:`jpeg_truncated` has to decide: its bottom-right pixel
    is exactly grey (128, 128, 128), which is what libjpeg puts in every block it gets no data for, or the file
    may be progressive (``FF C2`` in its first MiB: the coarse scans then cover the whole picture). Cheap, and
    false for almost every complete photo (black corners), so the second decode and libjpeg's warning about the
    probe bytes are spent only on suspects."""
    return bool((img[-1, -1] == 128).all()) or b"\xff\xc2" in data[: 1 << 20]


def jpeg_truncated(data: bytes, img: np.ndarray, flags: int) -> bool:
    """Whether the decoded ``img`` (``cv2.imdecode(data, flags)``) depends on data missing from the file.

    A complete JPEG's decoder finishes its last block before reaching the end marker, so bytes put just
    before that marker are never used: decoding again with :data:`_JPEG_PROBE` there gives the same pixels.
    A JPEG cut short and closed with ``FF D9`` makes libjpeg read those bytes as image data (then fill the
    rest with grey, with only a warning), and the pixels change. Exact for baseline JPEGs; a progressive
    JPEG is refused when what is missing changes the pixels decoded at this reduction.
    """
    end = data.rfind(b"\xff\xd9")
    if end < 0:
        return True
    # A cut after the first byte of a stuffed FF 00 pair leaves FF before the marker: complete the pair, or
    # FF + probe would read as a marker and the probe would never be decoded.
    probe = (b"\x00" if end and data[end - 1] == 0xFF else b"") + _JPEG_PROBE
    other = cv2.imdecode(np.frombuffer(data[:end] + probe + data[end:], np.uint8), flags)
    return other is None or other.shape != img.shape or not np.array_equal(other, img)


def decode(data: bytes, reduction: int = 1) -> np.ndarray:
    """Decode to a uint8 BGR array at 1/``reduction`` of the resolution, pixels as stored (EXIF orientation
    ignored, as in the serving graph).

    Raises:
        BadImage: OpenCV cannot decode it, or a JPEG is cut short (:func:`jpeg_truncated`).
    """
    flags = _REDUCED[reduction] | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise BadImage("corrupt image (OpenCV cannot decode it)")
    if data[:3] == b"\xff\xd8\xff" and jpeg_suspect(data, img) and jpeg_truncated(data, img, flags):
        raise BadImage(TRUNCATED_JPEG)
    return img


# ------------------------------------------------------------------------------------------- find disc


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (Kasa) circle through points."""
    a = np.stack([x, y, np.ones_like(x)], axis=1)
    b = x * x + y * y
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = sol[0] / 2, sol[1] / 2
    r = np.sqrt(max(sol[2] + cx * cx + cy * cy, 0.0))
    return float(cx), float(cy), float(r)


def find_disc(img: np.ndarray, work_side: int = 1024) -> Disc:
    """Find the fundus disc of a BGR or RGB uint8 photo.

    Works on a copy shrunk by a whole factor so its long side is at most ``work_side``: the brightness of each pixel is the
    maximum over its channels; the threshold sits at 10 % of the way from the dark margin level (1st percentile)
    to the bright level (99th percentile), so dark photos are found as well as bright ones. The largest blob's
    outline, minus the points lying on the photo's border (discs cut off at the top and bottom), gets a
    least-squares circle; points more than 2.5 median deviations off the circle (notches, tabs, glare) are
    dropped and the circle refitted.

    Raises:
        BadImage: no disc (a black or blank photo, or a blob too small to be a fundus).
    """
    h, w = img.shape[:2]
    if img.ndim == 3:
        channels = cv2.split(img)
        gray = channels[0]
        for c in channels[1:]:
            gray = cv2.max(gray, c)
    else:
        gray = img
    # Integer factor: OpenCV's area resize has a fast path for it.
    factor = max(1, -(-max(h, w) // work_side))
    scale = 1.0 / factor
    if factor > 1:
        gray = gray[: h - h % factor, : w - w % factor]
        gray = cv2.resize(gray, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    gray = cv2.medianBlur(np.ascontiguousarray(gray), 5)  # denoise without moving the edge
    cdf = np.cumsum(np.bincount(gray.ravel(), minlength=256)) / gray.size
    dark, bright = float(np.searchsorted(cdf, 0.01)), float(np.searchsorted(cdf, 0.99))
    if bright - dark < 8:
        raise BadImage(f"no fundus found (image is blank: brightness {dark:.0f}-{bright:.0f} of 255)")
    thr = dark + max(3.0, 0.1 * (bright - dark))
    mask = (gray > thr).astype(np.uint8)
    k = max(3, int(round(min(gray.shape) * 0.01)) | 1)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        raise BadImage("no fundus found (nothing brighter than the background)")
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    blob = (labels == biggest).astype(np.uint8)
    area = stats[biggest, cv2.CC_STAT_AREA]
    sh, sw = gray.shape
    if area < 0.02 * sh * sw:
        raise BadImage(f"no fundus found (largest bright region covers only {100 * area / (sh * sw):.1f} % of the photo)")
    contours, _ = cv2.findContours(blob, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = max(contours, key=len)[:, 0, :].astype(np.float64)
    x, y = pts[:, 0], pts[:, 1]
    inner = (x > 1) & (x < sw - 2) & (y > 1) & (y < sh - 2)
    if inner.sum() < 20:
        # No free outline: the disc fills the frame. Its bounding square is the frame's.
        bx, by, bw, bh = cv2.boundingRect(blob)
        cx, cy, r = bx + bw / 2, by + bh / 2, max(bw, bh) / 2
    else:
        x, y = x[inner], y[inner]
        cx, cy, r = _fit_circle(x, y)
        for _ in range(3):
            res = np.hypot(x - cx, y - cy) - r
            mad = np.median(np.abs(res - np.median(res))) + 0.5
            keep = np.abs(res) < 2.5 * 1.4826 * mad
            if keep.sum() < 20 or keep.all():
                break
            x, y = x[keep], y[keep]
            cx, cy, r = _fit_circle(x, y)
    # Contour pixel centres lie half a pixel inside the blob's edge.
    cx, cy, r = (cx + 0.5) / scale, (cy + 0.5) / scale, (r + 0.5) / scale
    if r < 16 or r > 2 * max(h, w):
        raise BadImage(f"no fundus found (fitted radius {r:.0f} px is implausible for a {w}x{h} photo)")
    return Disc(cx, cy, r)


def check_square(disc: Disc, max_pixels: int) -> None:
    """Refuse a disc whose bounding square (at the decoded resolution) would hold more than twice
    ``max_pixels``: only a crafted photo fits such a disc (a 20000x1000 strip with a 9800-px arc is 20 Mpx,
    under the limit, and its square 384 Mpx); real photos stay far below (a 16:9 photo at the limit with its
    disc cut at the top and bottom: 1.8 times the limit at full resolution, and reduced decoding shrinks it)."""
    side = max(2, int(round(2 * disc.r)))
    if side * side > 2 * max_pixels:
        raise BadImage(f"no fundus found (its bounding square, {side}x{side} px, would hold more than twice max_pixels)")


def crop_box(disc: Disc) -> tuple[int, int, int]:
    """``(x0, y0, side)``: the disc's bounding square in the photo, its top-left pixel and its side (``2r``
    rounded), in pixel coordinates of the photo the disc was found in.

    >>> crop_box(Disc(500.0, 400.0, 300.0))
    (200, 100, 600)
    """
    side = max(2, int(round(2 * disc.r)))
    return int(round(disc.cx - side / 2)), int(round(disc.cy - side / 2)), side


def crop_square(img: np.ndarray, disc: Disc) -> np.ndarray:
    """The disc's bounding square (side ``2r``), padded with black where it leaves the photo."""
    x0, y0, side = crop_box(disc)
    h, w = img.shape[:2]
    out = np.zeros((side, side) + img.shape[2:], img.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


def circular_mask(img: np.ndarray, fraction: float = 1.0, fill: int = 0) -> np.ndarray:
    """Set everything outside a centred circle of ``fraction`` of the half-side to ``fill``."""
    side = img.shape[0]
    m = np.zeros(img.shape[:2], np.uint8)
    cv2.circle(m, (side // 2, side // 2), int(round(side / 2 * fraction)), 255, -1, lineType=cv2.LINE_8)
    out = cv2.bitwise_and(img, img, mask=m)
    if fill:
        cv2.add(out, np.full_like(img, fill), dst=out, mask=cv2.bitwise_not(m))
    return out


def graham_normalize(img: np.ndarray) -> np.ndarray:
    """B. Graham's local-average-colour subtraction on a disc-centred square (radius = half the side):
    ``4*img - 4*GaussianBlur(img, sigma=radius/30) + 128``, then grey (128) outside 90 % of the radius."""
    radius = img.shape[0] / 2
    blurred = cv2.GaussianBlur(img, (0, 0), radius / 30)
    out = cv2.addWeighted(img, 4, blurred, -4, 128)
    return circular_mask(out, 0.9, fill=128)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    interp = cv2.INTER_AREA if img.shape[0] >= size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def preprocess_image(img_bgr: np.ndarray, sizes, config: PreprocessConfig = PreprocessConfig(), disc: Disc | None = None):
    """Crop, resize and normalise an already decoded BGR photo; returns ``({size: RGB uint8}, disc)``."""
    disc = disc or find_disc(img_bgr)
    square = crop_square(img_bgr, disc)
    images = {}
    source = square
    for size in sorted(set(int(s) for s in sizes), reverse=True):
        # Resize from the previous (larger) square when it is at least twice as big: same area average,
        # a fraction of the work.
        src = source if source.shape[0] >= 2 * size else square
        out = resize_square(src, size)
        source = out
        if config.normalize == "graham":
            final = graham_normalize(out)
        else:
            final = out
        if config.mask and config.normalize != "graham":
            final = circular_mask(final)
        images[size] = cv2.cvtColor(final, cv2.COLOR_BGR2RGB)
    return images, disc


def preprocess_file(path, sizes, config: PreprocessConfig = PreprocessConfig(), data: bytes | None = None) -> Preprocessed:
    """Check, decode (reduced when possible), find the disc and make every size of one file.

    Raises:
        BadImage: the file cannot be used (reason in the message).
        FileNotFoundError: the file does not exist.
    """
    if data is None:
        data = read_image_file(path, file_size_limit(config.max_pixels))
    info = probe(data, str(path), config.max_pixels)
    if min(info.width, info.height) < config.min_side:
        raise BadImage(
            f"image too small to hold a fundus ({info.width}x{info.height}; needs >= {config.min_side} px a side)"
        )
    largest = max(int(s) for s in sizes)
    k = choose_reduction(info, largest, config.reduced_decode)
    img = decode(data, k)
    disc = find_disc(img)
    if k > 1 and 2 * disc.r < largest:
        # The disc is smaller than the frame suggested: decode finer so no size is upscaled needlessly.
        k = refine_reduction(k, disc.r, largest)
        img = decode(data, k)
        disc = find_disc(img)
    check_square(disc, config.max_pixels)
    images, disc = preprocess_image(img, sizes, config, disc)
    full = Disc(disc.cx * k, disc.cy * k, disc.r * k)
    return Preprocessed(images, full, info, k)
