"""The training cache's fundus preprocessing, rewritten in TensorFlow ops for the ``predict_images`` signature.

TF Serving runs graphs, not Python: the OpenCV code of :mod:`retina_scale.data.fundus` cannot run there
(no ``py_function``). This module does the same steps with ``tf.*`` ops, one photo at a time:

1. **Check the header** (as :func:`retina_scale.data.fundus.probe`): empty, not JPEG/PNG (a TIFF or BMP is
   named as such: TensorFlow decodes neither), truncated (no JPEG end-of-image marker / PNG ``IEND`` chunk),
   grayscale, CMYK, 16-bit, smaller than 64 px, or more pixels than ``max_pixels`` (the header's size, read
   before anything is decoded: a 20000x20000 PNG bomb costs nothing): the image is marked invalid with a
   one-line reason and a black image goes on, so the rest of the batch is graded. The content decides the
   format (the graph gets no file name).
2. **Decode** JPEG at 1/2, 1/4 or 1/8 resolution through libjpeg's scaled IDCT (``decode_jpeg(ratio=k)``, what
   OpenCV's ``IMREAD_REDUCED_COLOR_k`` does) with the accurate integer IDCT OpenCV uses; PNG at full size,
   then area-averaged by ``k``. ``k`` is chosen as the cache chooses it, for ``decode_size`` (the largest
   size the training cache made; the stage size when unknown), and lowered when the disc is smaller than the
   frame suggested. Pixels are taken as stored (EXIF orientation ignored, in the cache too). A JPEG cut short
   and closed with ``FF D9`` is refused as the cache refuses it (:func:`_jpeg_truncated`).
3. **Find the disc** (as :func:`~retina_scale.data.fundus.find_disc`): channel maximum, shrink by a whole
   factor to at most 1024 px, 5x5 median (exactly OpenCV's), threshold at 10 % from the 1st to the 99th brightness percentile,
   morphological opening with an elliptical kernel, then a least-squares circle through the blob's outer edge
   (points on the photo's border left out) with three rounds of outlier rejection. One difference: OpenCV
   keeps the largest connected blob and fits its traced contour; here the outer edge is every mask pixel that
   is the first or last of its row or column, so a second bright blob (a caption) acts through the outlier
   rejection instead of being dropped.
4. **Crop** the disc's bounding square (black padding), **resize** to the stage size (area averaging when
   shrinking, bicubic when enlarging, rounded to whole grey levels), then **Graham's normalisation** (Gaussian
   blur with OpenCV's kernel size and reflect-101 border, ``4*img - 4*blur + 128``, grey outside 90 % of the
   radius) or the **circular mask** (black outside the disc), as the export's recorded preprocessing says.

How close it is to the cache is measured by ``tests/serving/test_predict_images.py`` (the parity test) and
stated in the README.
"""

from __future__ import annotations

import hashlib
import math

from retina_scale.config import MAX_PIXELS, MIN_SIDE, check_max_pixels
from retina_scale.utils.errors import UserError

__all__ = ["PreprocessSpec", "preprocess_spec", "preprocess_batch"]

_ZEROS64 = b"\x00" * 64
WORK_SIDE = 1024
ERROR_NONE = ""
# Put before a JPEG's last end marker to tell a complete JPEG from one cut short (see _jpeg_truncated):
# any bytes but 0xFF that decode to varied values.
_JPEG_PROBE = hashlib.shake_256(b"retina_scale serving: is this JPEG cut short?").digest(64).replace(b"\xff", b"\x7f")
TRUNCATED_JPEG = "truncated JPEG (its image data stops before the last row; the rest would be grey)"


class PreprocessSpec(tuple):
    """``(size, sizes, normalize, mask, max_pixels)``: what the graph does, parsed from the export's record.

    ``sizes`` are the training cache's sizes from the stage size up (the cache decodes for the largest and makes
    each size from the one above it when that is at least twice as big: the graph repeats that chain).
    ``max_pixels`` is the largest width x height decoded (larger photos get an error row).
    """

    __slots__ = ()

    def __new__(cls, size, sizes, normalize, mask, max_pixels=MAX_PIXELS):
        chain = tuple(sorted({int(s) for s in sizes if int(s) >= int(size)} | {int(size)}, reverse=True))
        return super().__new__(cls, (int(size), chain, str(normalize), bool(mask), int(max_pixels)))

    size = property(lambda self: self[0])
    sizes = property(lambda self: self[1])
    decode_size = property(lambda self: self[1][0])
    normalize = property(lambda self: self[2])
    mask = property(lambda self: self[3])
    max_pixels = property(lambda self: self[4])


def preprocess_spec(preprocessing, input_size: int) -> PreprocessSpec:
    """Reads the export's ``preprocessing`` record (None, ``"none"``, ``"graham"`` or the trainer's dict with
    ``normalize``, optional ``mask`` (default True, the cache's default), optional ``sizes`` (the cache's
    sizes: the largest decides the reduced decode, and the sizes in between the chain of resizes) and optional
    ``max_pixels`` (default :data:`retina_scale.config.MAX_PIXELS`)).

    Raises:
        ValueError: an unknown normalisation or a malformed record.
    """
    normalize, mask, sizes, max_pixels = "none", True, [int(input_size)], MAX_PIXELS
    if preprocessing is None or preprocessing == "":
        pass
    elif isinstance(preprocessing, str):
        normalize = preprocessing
    elif isinstance(preprocessing, dict):
        normalize = preprocessing.get("normalize", "none") or "none"
        mask = preprocessing.get("mask", True)
        if preprocessing.get("sizes"):
            sizes = preprocessing["sizes"]
            if not isinstance(sizes, list) or not all(isinstance(s, int) and 16 <= s <= 4096 for s in sizes):
                raise UserError(f"preprocessing 'sizes' must be a list of integers from 16 to 4096; got {sizes!r}")
        if not isinstance(mask, bool):
            raise UserError(f"preprocessing 'mask' must be true or false; got {mask!r}")
        max_pixels = check_max_pixels(preprocessing.get("max_pixels", MAX_PIXELS))
    else:
        raise UserError(f"preprocessing must be a name or a dict; got {type(preprocessing).__name__}")
    if normalize not in ("none", "graham"):
        raise UserError(f"preprocessing normalize must be 'none' or 'graham'; got {normalize!r}")
    return PreprocessSpec(input_size, sizes, normalize, mask, max_pixels)


# ------------------------------------------------------------------------------------------------ helpers


def _bytes_at(tf, data, pos, length):
    """uint8 values of ``data[pos:pos+length]`` (``length`` a python int; caller ensures it fits)."""
    return tf.cast(tf.io.decode_raw(tf.strings.substr(data, pos, length), tf.uint8), tf.int32)


def _first(tf, cases, default):
    """The value of the first true condition in ``cases`` ``[(cond, value), ...]``, else ``default``.

    All values are computed (they are small strings): ``tf.where`` chains keep the graph free of branch
    functions, which makes the export several times faster than ``tf.case``.
    """
    out = default
    for cond, value in reversed(cases):
        out = tf.where(cond, value, out)
    return out


def _tail_has(tf, data, n, pattern):
    """Whether ``pattern`` (bytes) occurs within the last 64 bytes of ``data`` (``n`` = its length)."""
    take = tf.minimum(n, 64)
    tail = tf.strings.join([tf.strings.substr(data, n - take, take), tf.strings.substr(_ZEROS64, 0, 64 - take)])
    tail = tf.cast(tf.io.decode_raw(tail, tf.uint8), tf.int32)  # the zeros pad after the data: no false hit
    count = 64 - len(pattern) + 1
    hits = tf.ones([count], tf.bool)
    for j, byte in enumerate(pattern):
        hits = tf.logical_and(hits, tf.equal(tail[j : j + count], byte))
    return tf.reduce_any(hits)


def _median_5x5(tf, gray):
    """5x5 median of a float ``(h, w)`` image of whole values in [0, 255], border replicated: equal to
    ``cv2.medianBlur(img, 5)``.

    Forgetful selection on the 25 shifted copies (keep 14, drop the minimum and maximum, add the next, ...):
    a few hundred element-wise min/max ops on uint8, ten times faster than ``top_k`` over 25-wide patches.
    """
    x = tf.cast(gray, tf.uint8)
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    p = tf.concat([x[:1], x[:1], x, x[-1:], x[-1:]], 0)
    p = tf.concat([p[:, :1], p[:, :1], p, p[:, -1:], p[:, -1:]], 1)
    values = [p[i : i + h, j : j + w] for i in range(5) for j in range(5)]

    def drop_min_max(vals):
        vals = list(vals)
        for i in range(len(vals) - 1):  # the maximum bubbles to the end
            vals[i], vals[i + 1] = tf.minimum(vals[i], vals[i + 1]), tf.maximum(vals[i], vals[i + 1])
        for i in range(len(vals) - 2, 0, -1):  # the minimum bubbles to the front
            vals[i - 1], vals[i] = tf.minimum(vals[i - 1], vals[i]), tf.maximum(vals[i - 1], vals[i])
        return vals[1:-1]

    keep = values[:14]
    for extra in values[14:]:
        keep = drop_min_max(keep) + [extra]
    while len(keep) > 1:
        keep = drop_min_max(keep)
    return tf.cast(keep[0], tf.float32)


def _ellipse(k: int):
    """OpenCV's ``getStructuringElement(MORPH_ELLIPSE, (k, k))`` as a python list of 0/1 rows."""
    r = k // 2
    inv_r2 = 1.0 / (r * r) if r else 0.0
    rows = []
    for i in range(k):
        dy = i - r
        if abs(dy) <= r:
            dx = int(round(r * math.sqrt(max(0.0, (r * r - dy * dy) * inv_r2)))) if r else 0
            a, b = max(r - dx, 0), min(r + dx + 1, k)
        else:
            a, b = 0, 0
        rows.append([1 if a <= j < b else 0 for j in range(k)])
    return rows


def _open(tf, mask, k):
    """Morphological opening of a 0/1 float ``(h, w)`` mask with an elliptical ``k x k`` kernel (``k`` a tensor).

    The work image's short side is at most ``WORK_SIDE`` (1024), so ``k`` is one of 3, 5, 7, 9, 11: one
    ``tf.switch_case`` branch each (op attributes are static).
    """
    x = mask[None, :, :, None]

    def branch(size):
        se = tf.constant(_ellipse(size), tf.float32)
        # Flat structuring element: 0 inside, -1e4 outside (added by dilation2d before the max).
        filt = ((se - 1.0) * 1e4)[:, :, None]

        def run():
            # OpenCV pads erosion with +inf and dilation with -inf; dilation2d's SAME padding ignores the
            # padded values, which is the same: the border neither erodes nor dilates the mask.
            eroded = -tf.nn.dilation2d(-x, filt, [1, 1, 1, 1], "SAME", "NHWC", [1, 1, 1, 1])
            return tf.nn.dilation2d(eroded, filt, [1, 1, 1, 1], "SAME", "NHWC", [1, 1, 1, 1])

        return run

    sizes = list(range(3, 2 * (int(round(WORK_SIDE * 0.01)) // 2) + 2, 2))
    index = tf.clip_by_value((k - 3) // 2, 0, len(sizes) - 1)
    return tf.switch_case(index, [branch(s) for s in sizes])[0, :, :, 0]


def _median(tf, values):
    """numpy's median of a float64 vector (mean of the two middle values when the count is even)."""
    n = tf.shape(values)[0]
    s = tf.concat([tf.sort(values), tf.zeros([1], values.dtype)], 0)  # an empty vector's median reads 0
    lo = s[tf.maximum((n - 1) // 2, 0)]
    hi = s[tf.maximum(n // 2, 0)]
    return (lo + hi) / 2.0


def _fit_circle(tf, x, y, w):
    """Weighted Kasa circle (weights 0/1) through float64 points."""
    a = tf.stack([x, y, tf.ones_like(x)], axis=1) * w[:, None]
    b = (x * x + y * y) * w
    sol = tf.linalg.lstsq(a, b[:, None], fast=False)[:, 0]
    cx, cy = sol[0] / 2.0, sol[1] / 2.0
    r = tf.sqrt(tf.maximum(sol[2] + cx * cx + cy * cy, 0.0))
    return cx, cy, r


def find_disc(tf, img):
    """The disc ``(cx, cy, r, error)`` of a uint8 RGB ``(h, w, 3)`` image (see the module docstring).

    ``error`` is an empty string when a disc was found, else the reason (as ``find_disc`` words it).
    Everything is computed and the right result selected: no branches (see :func:`_first`).
    """
    shape = tf.shape(img)
    h, w = shape[0], shape[1]
    factor = tf.maximum(1, (tf.maximum(h, w) + WORK_SIDE - 1) // WORK_SIDE)
    mask, dark, bright = _bright_mask(tf, tf.reduce_max(img, axis=2), factor)
    area = tf.reduce_sum(tf.cast(mask, tf.float32))
    x, y = _outer_edge(tf, mask)
    # Too few points to fit: the bounding box is used. Degenerate inputs (no points) give inf/NaN
    # values that are replaced below.
    few = tf.shape(x)[0] < 20
    fitted = _robust_circle(tf, x, y, few)
    has_points = area > 0
    ok = lambda v: tf.where(has_points & tf.math.is_finite(v), v, 0.0)  # noqa: E731
    cx, cy, r = (ok(tf.where(few, b, f)) for b, f in zip(_bounding_circle(tf, mask), fitted))
    scale = tf.cast(factor, tf.float64)
    cx, cy, r = (cx + 0.5) * scale, (cy + 0.5) * scale, (r + 0.5) * scale
    size = tf.cast(tf.size(mask), tf.float32)
    fmt = lambda v: tf.strings.as_string(v, precision=0)  # noqa: E731
    error = _first(tf, [
        (bright - dark < 8, tf.strings.join(
            ["no fundus found (image is blank: brightness ", fmt(dark), "-", fmt(bright), " of 255)"])),
        (~has_points, "no fundus found (nothing brighter than the background)"),
        (area < 0.02 * size, tf.strings.join(
            ["no fundus found (largest bright region covers only ",
             tf.strings.as_string(100.0 * area / size, precision=1), " % of the photo)"])),
        ((r < 16) | (r > 2 * tf.cast(tf.maximum(h, w), tf.float64)), tf.strings.join(
            ["no fundus found (fitted radius ", fmt(r), " px is implausible for a ",
             tf.strings.as_string(w), "x", tf.strings.as_string(h), " photo)"])),
    ], ERROR_NONE)
    return cx, cy, r, error


def _bright_mask(tf, gray, factor):
    """``(mask, dark, bright)``: the fundus mask of the channel maximum ``gray`` shrunk by ``factor``.

    Area-shrink, 5x5 median, threshold at 10 % from the 1st to the 99th brightness percentile (at least
    3 grey levels above the dark one), opening with an elliptical kernel of 1 % of the short side.
    """
    h, w = tf.shape(gray)[0], tf.shape(gray)[1]
    sh, sw = h // factor, w // factor
    g = tf.cast(gray[: sh * factor, : sw * factor], tf.float32)  # a factor of 1 leaves it as it is
    g = tf.round(tf.reduce_mean(tf.reshape(g, [sh, factor, sw, factor]), axis=[1, 3]))
    g = _median_5x5(tf, g)
    gi = tf.cast(g, tf.int32)
    size = tf.cast(sh * sw, tf.float64)
    cdf = tf.cast(tf.cumsum(tf.math.bincount(tf.reshape(gi, [-1]), minlength=256, maxlength=256)), tf.float64) / size
    dark = tf.cast(tf.searchsorted(cdf, tf.constant([0.01], tf.float64), side="left")[0], tf.float32)
    bright = tf.cast(tf.searchsorted(cdf, tf.constant([0.99], tf.float64), side="left")[0], tf.float32)
    thr = dark + tf.maximum(3.0, 0.1 * (bright - dark))
    mask = tf.cast(g > thr, tf.float32)
    k = tf.maximum(3, tf.bitwise.bitwise_or(tf.cast(tf.round(tf.cast(tf.minimum(sh, sw), tf.float32) * 0.01), tf.int32), 1))
    return _open(tf, mask, k) > 0.5, dark, bright


def _outer_edge(tf, mask):
    """float64 ``(x, y)`` of the outer edge: the first and last mask pixel of every row and column,
    without the points on (or next to) the photo's border."""
    m = tf.cast(mask, tf.int32)
    row_l = tf.logical_and(mask, tf.equal(tf.cumsum(m, axis=1), 1))
    row_r = tf.logical_and(mask, tf.equal(tf.cumsum(m, axis=1, reverse=True), 1))
    col_t = tf.logical_and(mask, tf.equal(tf.cumsum(m, axis=0), 1))
    col_b = tf.logical_and(mask, tf.equal(tf.cumsum(m, axis=0, reverse=True), 1))
    edge = tf.logical_or(tf.logical_or(row_l, row_r), tf.logical_or(col_t, col_b))
    pts = tf.cast(tf.where(edge), tf.float64)
    y, x = pts[:, 0], pts[:, 1]
    shf, swf = tf.cast(tf.shape(mask)[0], tf.float64), tf.cast(tf.shape(mask)[1], tf.float64)
    inner = (x > 1) & (x < swf - 2) & (y > 1) & (y < shf - 2)
    return tf.boolean_mask(x, inner), tf.boolean_mask(y, inner)


def _bounding_circle(tf, mask):
    """float64 ``(cx, cy, r)`` of the mask's bounding box (r: half its longer side)."""
    where = tf.cast(tf.where(mask), tf.float64)
    y0, x0 = tf.reduce_min(where[:, 0]), tf.reduce_min(where[:, 1])
    y1, x1 = tf.reduce_max(where[:, 0]) + 1, tf.reduce_max(where[:, 1]) + 1
    return (x0 + x1) / 2, (y0 + y1) / 2, tf.maximum(x1 - x0, y1 - y0) / 2


def _robust_circle(tf, x, y, few):
    """float64 ``(cx, cy, r)``: a least-squares circle through the points with three rounds of outlier
    rejection (residual beyond 2.5 robust standard deviations). With ``few`` points, 20 dummy points on
    the unit circle are fitted instead, so nothing fails (the caller then uses the bounding box)."""
    angles = tf.constant([2 * math.pi * i / 20 for i in range(20)], tf.float64)
    xs, ys = tf.cond(few, lambda: (tf.cos(angles), tf.sin(angles)), lambda: (x, y))
    keep = tf.ones_like(xs)
    cx, cy, r = _fit_circle(tf, xs, ys, keep)
    done = few
    for _ in range(3):
        res = tf.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) - r
        kept = tf.boolean_mask(res, keep > 0)
        mad = _median(tf, tf.abs(kept - _median(tf, kept))) + 0.5
        new_keep = keep * tf.cast(tf.abs(res) < 2.5 * 1.4826 * mad, tf.float64)
        n_new, n_old = tf.reduce_sum(new_keep), tf.reduce_sum(keep)
        done = done | (n_new < 20) | tf.equal(n_new, n_old)
        ncx, ncy, nr = _fit_circle(tf, xs, ys, tf.where(done, keep, new_keep))
        keep = tf.where(done, keep, new_keep)
        cx, cy, r = tf.where(done, cx, ncx), tf.where(done, cy, ncy), tf.where(done, r, nr)
    return cx, cy, r


def _check_header(tf, data, min_side=MIN_SIDE, max_pixels=MAX_PIXELS):
    """``(format, height, width, error)``: format 1 JPEG, 2 PNG, 0 unusable (``error`` says why).

    Nothing is decoded here: the size comes from the JPEG frame header or the PNG ``IHDR`` chunk, and a photo
    of more than ``max_pixels`` pixels is refused before any decoder allocates its pixels.
    """
    n = tf.strings.length(data)
    head = _bytes_at(tf, tf.strings.join([tf.strings.substr(data, 0, 33), _ZEROS64]), 0, 33)
    is_jpeg = (n >= 4) & tf.reduce_all(tf.equal(head[:3], [0xFF, 0xD8, 0xFF]))
    is_png = (n >= 33) & tf.reduce_all(tf.equal(head[:8], [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]))
    is_tiff = tf.reduce_all(tf.equal(head[:4], [0x49, 0x49, 0x2A, 0])) | tf.reduce_all(tf.equal(head[:4], [0x4D, 0x4D, 0, 0x2A]))
    is_bmp = tf.reduce_all(tf.equal(head[:2], [0x42, 0x4D]))

    def be32(b):  # in int64: a crafted header's 0xFFFFFFFF must not wrap to a negative int32
        b = tf.cast(b, tf.int64)
        return ((b[0] * 256 + b[1]) * 256 + b[2]) * 256 + b[3]

    jpeg_ok = is_jpeg & _tail_has(tf, data, n, [0xFF, 0xD9])
    # extract_jpeg_shape fails on what is not a JPEG: the one branch left in the header checks.
    hwc = tf.cond(jpeg_ok, lambda: tf.io.extract_jpeg_shape(data), lambda: tf.zeros([3], tf.int32))
    png_ok = is_png & tf.reduce_all(tf.equal(head[12:16], [73, 72, 68, 82]))  # IHDR
    png_ok = png_ok & _tail_has(tf, data, n, [73, 69, 78, 68])  # IEND
    png_channels = tf.gather([1, -1, 3, 3, 2, -1, 4], tf.clip_by_value(head[25], 0, 6))
    ok = tf.where(is_jpeg, jpeg_ok, png_ok)
    zero = tf.constant(0, tf.int64)
    height = tf.where(is_jpeg, tf.cast(hwc[0], tf.int64), tf.where(is_png, be32(head[20:24]), zero))
    width = tf.where(is_jpeg, tf.cast(hwc[1], tf.int64), tf.where(is_png, be32(head[16:20]), zero))
    channels = tf.where(is_jpeg, hwc[2], tf.where(is_png, png_channels, 0))
    depth = tf.where(is_jpeg, 8, tf.where(is_png, head[24], 0))
    fmt = tf.where(is_jpeg, 1, tf.where(is_png, 2, 0))
    s = tf.strings.as_string
    other = "; predict_images decodes JPEG and PNG only; convert it to PNG"
    error = _first(tf, [
        (tf.equal(n, 0), "empty file (0 bytes)"),
        (is_tiff, "TIFF image" + other),
        (is_bmp, "BMP image" + other),
        (~is_jpeg & ~is_png, "not an image (unknown file signature; accepted: JPEG, PNG)"),
        (is_jpeg & ~ok, "truncated JPEG (no end-of-image marker)"),
        (is_png & ~ok, "truncated or corrupt PNG (no IHDR header or IEND chunk)"),
        ((channels == 1) | (channels == 2), "grayscale image; colour fundus photos needed"),
        (is_jpeg & (channels == 4), "CMYK JPEG (4 colour components); convert it to RGB"),
        ((channels != 3) & (channels != 4), tf.strings.join(
            ["unsupported colour layout (", s(channels), " channels)"])),
        (depth != 8, tf.strings.join([s(depth), "-bit image (8 bits per channel expected)"])),
        (tf.minimum(height, width) < min_side, tf.strings.join(
            ["image too small to hold a fundus (", s(width), "x", s(height), "; needs >= ", s(min_side),
             " px a side)"])),
        # Either side over the limit first: two 32-bit PNG sides could overflow the int64 product.
        ((width > max_pixels) | (height > max_pixels) | (width * height > max_pixels), tf.strings.join(
            ["image too large (", s(width), "x", s(height), " = ",
             s(tf.cast(width, tf.float64) * tf.cast(height, tf.float64) / 1e6, precision=1),
             " Mpx; the limit is ", f"{max_pixels / 1e6:g}", " Mpx, max_pixels)"])),
    ], ERROR_NONE)
    fmt = tf.where(tf.equal(error, ERROR_NONE), fmt, 0)
    # Under the limit both fit an int32 (the decoders' and the shape ops' type).
    return fmt, tf.cast(tf.minimum(height, 2**31 - 1), tf.int32), tf.cast(tf.minimum(width, 2**31 - 1), tf.int32), error


def _with_probe(tf, data):
    """``data`` with :data:`_JPEG_PROBE` put before its last ``FF D9`` (in the last 64 bytes: the header
    checks made sure), after a ``00`` when the byte before the marker is a lone ``FF`` (see
    :func:`retina_scale.data.fundus.jpeg_truncated`)."""
    n = tf.strings.length(data)
    take = tf.minimum(n, 64)
    tail = tf.cast(tf.io.decode_raw(tf.strings.substr(data, n - take, take), tf.uint8), tf.int32)
    hits = tf.where((tail[:-1] == 0xFF) & (tail[1:] == 0xD9))[:, 0]
    last = tf.cast(tf.reduce_max(tf.concat([hits, [0]], 0)), tf.int32)
    end = n - take + last
    lone_ff = tf.equal(_bytes_at(tf, data, tf.maximum(end - 1, 0), 1)[0], 0xFF)
    return tf.strings.join([tf.strings.substr(data, 0, end), tf.where(lone_ff, "\x00", ""), _JPEG_PROBE,
                            tf.strings.substr(data, end, n - end)])


def _jpeg_truncated(tf, data, img, ratio, progressive):
    """Whether the decoded JPEG ``img`` depends on data missing from the file (a file cut short and closed
    with ``FF D9``), decided as :func:`retina_scale.data.fundus.jpeg_truncated` decides it: the photo is
    decoded again with probe bytes before its end marker, which a complete JPEG never reads. Only suspects
    (bottom-right pixel exactly grey, what libjpeg fills missing blocks with, or ``progressive``) pay for
    the second decode."""
    suspect = progressive | tf.reduce_all(tf.equal(img[-1, -1], 128))

    def check():
        again = tf.io.decode_jpeg(_with_probe(tf, data), channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
        same = tf.reduce_all(tf.equal(tf.shape(again), tf.shape(img)))
        return tf.logical_not(same) | tf.reduce_any(tf.not_equal(again, img))

    return tf.cond(suspect, check, lambda: tf.constant(False))


def _maybe_progressive(tf, data):
    """``FF C2`` (a progressive frame header) in the first MiB. Entropy-coded data never holds it (an ``FF``
    there is followed by ``00`` or a restart marker); a false hit only costs a second decode."""
    head = tf.io.decode_raw(tf.strings.substr(data, 0, 1 << 20), tf.uint8)
    return tf.reduce_any((head[:-1] == 0xFF) & (head[1:] == 0xC2))


def _decode(tf, data, fmt, k, progressive):
    """``(uint8 RGB at 1/k of the resolution, truncated)`` (``k`` in 1, 2, 4, 8; a tensor); ``truncated`` is
    true for a JPEG cut short (:func:`_jpeg_truncated`)."""

    def jpeg(ratio):
        def run():
            img = tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
            return img, _jpeg_truncated(tf, data, img, ratio, progressive)

        return run

    def png():
        img = tf.io.decode_png(data, channels=3)

        def shrink():
            # Block sums in uint16 (at most 8 * 8 * 255), one axis at a time: a third of the memory of a float32
            # copy of a 40-Mpx photo, and the same values (the sum is exact, k * k a power of two).
            shape = tf.shape(img)
            h, w = shape[0] // k, shape[1] // k
            blocks = tf.reshape(tf.cast(img[: h * k, : w * k], tf.uint16), [h, k, w, k, 3])
            sums = tf.reduce_sum(tf.reduce_sum(blocks, axis=3), axis=1)
            return tf.cast(tf.round(tf.cast(sums, tf.float32) / tf.cast(k * k, tf.float32)), tf.uint8)

        return tf.cond(k > 1, shrink, lambda: img), tf.constant(False)

    index = tf.cast(tf.round(tf.math.log(tf.cast(k, tf.float32)) / math.log(2.0)), tf.int32)
    return tf.cond(
        tf.equal(fmt, 1),
        lambda: tf.switch_case(index, [jpeg(1), jpeg(2), jpeg(4), jpeg(8)]),
        png,
    )


def _choose_reduction(tf, height, width, largest):
    short = tf.minimum(height, width)
    return _first(tf, [(short // 8 >= largest, 8), (short // 4 >= largest, 4), (short // 2 >= largest, 2)], 1)


def _crop_square(tf, img, cx, cy, r):
    """The disc's bounding square, black where it leaves the photo (``crop_square``; Python's round is
    round-half-even, as ``tf.round``)."""
    side = tf.maximum(2, tf.cast(tf.round(2 * r), tf.int32))
    x0 = tf.cast(tf.round(cx - tf.cast(side, tf.float64) / 2), tf.int32)
    y0 = tf.cast(tf.round(cy - tf.cast(side, tf.float64) / 2), tf.int32)
    shape = tf.shape(img)
    h, w = shape[0], shape[1]
    # Crop the part inside the photo, then pad it to the square (padding the whole photo first would cost a
    # photo-wide copy as large as the square is tall).
    ya, xa = tf.clip_by_value(y0, 0, h), tf.clip_by_value(x0, 0, w)
    yb, xb = tf.clip_by_value(y0 + side, ya, h), tf.clip_by_value(x0 + side, xa, w)
    inside = img[ya:yb, xa:xb]
    return tf.pad(inside, [[ya - y0, y0 + side - yb], [xa - x0, x0 + side - xb], [0, 0]])


def _check_square(tf, r, max_pixels):
    """``""``, or the reason when the disc's bounding square (side ``2r`` at the decoded resolution) would hold
    more than twice ``max_pixels``: a crafted photo under the limit whose fitted disc is huge (a 20000x1000
    strip with a 9800-px arc) would otherwise cost gigabytes here (as
    :func:`retina_scale.data.fundus.check_square`)."""
    side = tf.maximum(tf.constant(2, tf.int64), tf.cast(tf.round(2 * r), tf.int64))
    s = tf.strings.as_string(side)
    return tf.where(side * side > 2 * max_pixels, tf.strings.join(
        ["no fundus found (its bounding square, ", s, "x", s, " px, would hold more than twice max_pixels)"]),
        ERROR_NONE)


def _circle(tf, side, fraction):
    """Boolean ``(side, side)``: inside OpenCV's filled ``cv2.circle`` at ``(side//2, side//2)``."""
    c = side // 2
    radius = tf.round(tf.cast(side, tf.float64) / 2 * fraction)
    idx = tf.cast(tf.range(side) - c, tf.float64)
    d2 = idx[None, :] ** 2 + idx[:, None] ** 2
    return d2 <= radius * radius


def _gaussian_blur(tf, img, sigma: float):
    """``cv2.GaussianBlur(uint8 img, (0, 0), sigma)``: kernel size ``round(6 sigma + 1) | 1``, reflect-101 border,
    result rounded to whole values. ``img`` float32 ``(s, s, 3)``, ``sigma`` a python float."""
    ksize = int(round(sigma * 6 + 1)) | 1
    half = ksize // 2
    xs = [i - half for i in range(ksize)]
    weights = [math.exp(-(x * x) / (2 * sigma * sigma)) for x in xs]
    total = sum(weights)
    kern = tf.constant([v / total for v in weights], tf.float32)
    x = tf.transpose(img, [2, 0, 1])[:, :, :, None]  # (3, s, s, 1)
    x = tf.pad(x, [[0, 0], [half, half], [half, half], [0, 0]], mode="REFLECT")
    x = tf.nn.conv2d(x, tf.reshape(kern, [ksize, 1, 1, 1]), 1, "VALID")
    x = tf.nn.conv2d(x, tf.reshape(kern, [1, ksize, 1, 1]), 1, "VALID")
    return tf.round(tf.transpose(x[:, :, :, 0], [1, 2, 0]))


def _finish(tf, square, spec: PreprocessSpec):
    """Resize the uint8 square to the stage size, then normalise / mask; float32 RGB in [0, 255]."""
    size = spec.size
    square = square[None]  # uint8: the resize ops read it as it is, without a float32 copy of the square
    source = square
    for i, s in enumerate(spec.sizes):
        # As preprocess_image: each size from the previous (larger) one when that is at least twice as big.
        if i > 0 and spec.sizes[i - 1] >= 2 * s:
            out = tf.image.resize(source, (s, s), method="area")
        else:
            # Both are cheap next to the decode (bicubic samples 4x4 per output pixel): select, no branch.
            out = tf.where(
                tf.shape(square)[1] >= s,
                tf.image.resize(square, (s, s), method="area"),
                tf.image.resize(square, (s, s), method="bicubic"),
            )
        source = tf.clip_by_value(tf.round(out), 0.0, 255.0)
    out = tf.ensure_shape(source[0], [size, size, 3])
    if spec.normalize == "graham":
        blurred = _gaussian_blur(tf, out, size / 2 / 30)
        out = tf.clip_by_value(tf.round(4 * out - 4 * blurred + 128), 0.0, 255.0)
        inside = _circle(tf, size, 0.9)[:, :, None]
        out = tf.where(inside, out, 128.0)
    elif spec.mask:
        out = tf.where(_circle(tf, size, 1.0)[:, :, None], out, 0.0)
    return out


def preprocess_one(tf, data, spec: PreprocessSpec):
    """One encoded photo (scalar tf.string) -> ``(image float32 (size, size, 3), error string)``."""
    fmt, height, width, error = _check_header(tf, data, max_pixels=spec.max_pixels)
    blank = tf.zeros([spec.size, spec.size, 3], tf.float32)

    def run():
        # Decode and find the disc; when the disc is smaller than the frame suggested, decode finer and find it
        # again so no size is upscaled needlessly (as preprocess_file). One loop body: a smaller graph.
        progressive = tf.equal(fmt, 1) & _maybe_progressive(tf, data)

        def body(i, k, img, cx, cy, r, err, again):
            img, truncated = _decode(tf, data, fmt, k, progressive)
            cx, cy, r, err = find_disc(tf, img)
            err = tf.where(truncated, TRUNCATED_JPEG, err)
            kk, rr = k, r
            for _ in range(3):
                step = (kk > 1) & (2 * rr < spec.decode_size)
                kk = tf.where(step, kk // 2, kk)
                rr = tf.where(step, rr * 2, rr)
            again = tf.equal(err, ERROR_NONE) & tf.not_equal(kk, k)
            return i + 1, kk, img, cx, cy, r, err, again

        zero = tf.constant(0.0, tf.float64)
        start = (tf.constant(0), _choose_reduction(tf, height, width, spec.decode_size),
                 tf.zeros([0, 0, 3], tf.uint8), zero, zero, zero, tf.constant(ERROR_NONE), tf.constant(True))
        _, _, img, cx, cy, r, err, _ = tf.while_loop(
            lambda i, *rest: (i < 2) & rest[-1], body, start,
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([]), tf.TensorShape([None, None, 3]))
            + (tf.TensorShape([]),) * 5,
            maximum_iterations=2,
        )

        err = tf.where(tf.equal(err, ERROR_NONE), _check_square(tf, r, spec.max_pixels), err)
        found = tf.equal(err, ERROR_NONE)
        one = tf.constant(1.0, tf.float64)
        square = _crop_square(tf, img, tf.where(found, cx, one), tf.where(found, cy, one), tf.where(found, r, one))
        return tf.where(found, _finish(tf, square, spec), blank), err

    return tf.cond(tf.equal(error, ERROR_NONE), run, lambda: (blank, error))


def _no_autograph(fn):
    # Plain graph code: AutoGraph's rewriting would only slow the export down.
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(fn)


def preprocess_batch(images, spec: PreprocessSpec):
    """A batch of encoded photos (tf.string ``(batch,)``) -> ``(float32 (batch, size, size, 3), error (batch,))``.

    ``error`` is ``""`` for a usable photo, else the reason; the image of an unusable photo is black.
    """
    import tensorflow as tf

    return tf.map_fn(
        _no_autograph(lambda d: preprocess_one(tf, d, spec)),
        images,
        fn_output_signature=(
            tf.TensorSpec([spec.size, spec.size, 3], tf.float32),
            tf.TensorSpec([], tf.string),
        ),
        parallel_iterations=4,
    )
