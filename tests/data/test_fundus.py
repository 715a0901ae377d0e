"""Disc finding, cropping, normalisation and the header checks of fundus preprocessing."""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
import pytest
import skimage.data

from fundus_fixtures import draw_fundus
from hostile_fixtures import cut_jpeg, png_claiming, tiff_claiming, with_exif_orientation
from retina_scale.config import PreprocessConfig
from retina_scale.data.fundus import BadImage, choose_reduction, circular_mask, crop_square, find_disc, graham_normalize, preprocess_file, probe
from retina_scale.data.fundus import decode, file_size_limit, read_image_file


def _retina_truth():
    """The scikit-image photo's disc measured independently: bounding box of its non-black pixels."""
    rgb = skimage.data.retina()
    ys, xs = np.nonzero(rgb.max(axis=2) > 20)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    r = (xs.max() - xs.min() + 1 + ys.max() - ys.min() + 1) / 4
    return rgb, cx, cy, r


@pytest.fixture(scope="module")
def eyepacs_size_canvas():
    rgb, cx, cy, r = _retina_truth()
    canvas = np.zeros((2592, 3888, 3), np.uint8)
    ox, oy = 2350, 1050  # off-centre: the disc's right edge is 127 px from the frame's
    canvas[oy : oy + rgb.shape[0], ox : ox + rgb.shape[1]] = rgb
    return canvas, cx + ox, cy + oy, r


def test_finds_the_real_photo_disc_off_centre_in_an_eyepacs_size_canvas(eyepacs_size_canvas):
    canvas, cx, cy, r = eyepacs_size_canvas
    d = find_disc(canvas)
    assert abs(d.cx - cx) <= 4 and abs(d.cy - cy) <= 4, (d, cx, cy)
    assert abs(d.r - r) <= 5, (d.r, r)


def test_real_photo_through_reduced_decoding_and_crop(eyepacs_size_canvas):
    canvas, cx, cy, r = eyepacs_size_canvas
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    out = preprocess_file("canvas.jpeg", (112, 224), PreprocessConfig(), data=buf.tobytes())
    # 2592 / 8 >= 224 would allow 1/8, but the disc (~1394 px) then spans 174 px < 224: it falls back to 1/4.
    assert out.reduction == 4
    assert abs(out.disc.cx - cx) <= 6 and abs(out.disc.cy - cy) <= 6 and abs(out.disc.r - r) <= 8, out.disc
    img = out.images[224]
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    # The crop is the disc's bounding square: the disc touches all four sides, corners are masked black.
    bright = img.max(axis=2) > 20
    assert bright[112, :4].any() and bright[112, -4:].any() and bright[:4, 112].any() and bright[-4:, 112].any()
    assert not bright[:20, :20].any() and not bright[-20:, -20:].any()
    # RGB order: a fundus is red.
    inner = img[bright]
    assert inner[:, 0].mean() > 2 * inner[:, 2].mean()


@pytest.mark.parametrize("case", ["cut_top_bottom", "notch", "dark", "off_centre_small"])
def test_disc_found_on_hard_cases(case):
    kw = {"cut_top_bottom": dict(width=640, height=400, cx=320, cy=200, r=240),
          "notch": dict(width=500, height=400, cx=250, cy=200, r=180, notch=True),
          "dark": dict(width=500, height=400, cx=230, cy=210, r=170, brightness=0.12),
          "off_centre_small": dict(width=800, height=600, cx=560, cy=380, r=120)}[case]
    img = draw_fundus(seed=5, **kw)
    d = find_disc(img)
    assert abs(d.cx - kw["cx"]) <= 2 and abs(d.cy - kw["cy"]) <= 2 and abs(d.r - kw["r"]) <= 2, (case, d)


def test_crop_square_pads_a_cut_disc_with_black():
    img = draw_fundus(width=640, height=400, cx=320, cy=200, r=240)
    d = find_disc(img)
    sq = crop_square(img, d)
    assert sq.shape[0] == sq.shape[1] == int(round(2 * d.r))
    assert sq[:20].max() == 0 and sq[-20:].max() == 0  # the parts above and below the photo
    assert sq[sq.shape[0] // 2, 10:-10].min() > 0  # the full width of the disc is kept


def test_graham_normalisation_and_circular_mask():
    flat = np.zeros((200, 200, 3), np.uint8)
    cv2.circle(flat, (100, 100), 100, (40, 90, 200), -1)
    g = graham_normalize(flat)
    yy, xx = np.mgrid[:200, :200]
    rr = np.hypot(xx - 99.5, yy - 99.5)
    # A flat disc has no local detail: 4*img - 4*blur + 128 is 128 well inside it.
    assert np.abs(g[rr < 50].astype(int) - 128).max() <= 2
    assert (g[rr > 92] == 128).all()  # grey outside 90 % of the radius
    m = circular_mask(np.full((64, 64, 3), 200, np.uint8))
    assert m[0, 0].max() == 0 and m[32, 32].min() == 200


def test_reduced_decoding_matches_full_decoding():
    img = draw_fundus(width=1600, height=1200, seed=2)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    fast = preprocess_file("a.jpeg", (128,), PreprocessConfig(), data=buf.tobytes())
    slow = preprocess_file("a.jpeg", (128,), PreprocessConfig(reduced_decode=False), data=buf.tobytes())
    assert fast.reduction == 8 and slow.reduction == 1
    diff = np.abs(fast.images[128].astype(int) - slow.images[128].astype(int))
    assert diff.mean() < 3, diff.mean()


def test_choose_reduction():
    from retina_scale.data.fundus import ImageInfo

    info = ImageInfo("JPEG", 3888, 2592, 3, 8)
    assert [choose_reduction(info, s) for s in (112, 224, 448, 896, 2000)] == [8, 8, 4, 2, 1]
    assert choose_reduction(info, 112, allowed=False) == 1


def _jpeg(img, **kw):
    return cv2.imencode(".jpg", img)[1].tobytes()


def _cmyk_jpeg():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(draw_fundus()[:, :, ::-1]).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name,make,reason", [
    ("a.jpeg", lambda: b"", "empty file"),
    ("a.jpeg", lambda: _jpeg(draw_fundus())[:-2000], "truncated JPEG"),
    ("a.png", lambda: cv2.imencode(".png", draw_fundus())[1].tobytes()[:-30], "truncated PNG"),
    ("a.jpeg", lambda: _jpeg(cv2.cvtColor(draw_fundus(), cv2.COLOR_BGR2GRAY)), "grayscale image"),
    ("a.jpeg", _cmyk_jpeg, "CMYK JPEG"),
    ("a.png", lambda: cv2.imencode(".png", draw_fundus().astype(np.uint16) * 257)[1].tobytes(), "16-bit image"),
    ("a.jpeg", lambda: b"hello, not an image", "not an image"),
])
def test_probe_refuses_with_its_own_reason(name, make, reason):
    with pytest.raises(BadImage, match=reason):
        probe(make(), name)


def test_good_files_pass_the_probe():
    info = probe(_jpeg(draw_fundus(width=300, height=200)), "x.jpeg")
    assert (info.format, info.width, info.height, info.channels, info.bit_depth) == ("JPEG", 300, 200, 3, 8)
    info = probe(cv2.imencode(".png", draw_fundus(width=90, height=70))[1].tobytes(), "x.png")
    assert (info.format, info.width, info.height) == ("PNG", 90, 70)


def test_too_small_and_black_photos_are_refused():
    with pytest.raises(BadImage, match="too small to hold a fundus"):
        preprocess_file("s.jpeg", (112,), data=_jpeg(draw_fundus(width=60, height=40)))
    with pytest.raises(BadImage, match="no fundus found"):
        preprocess_file("b.jpeg", (112,), data=_jpeg(np.zeros((400, 600, 3), np.uint8)))
    speck = np.zeros((400, 600, 3), np.uint8)
    speck[10:20, 10:20] = 200  # a bright label in a corner is not a fundus
    with pytest.raises(BadImage, match="no fundus found"):
        find_disc(speck)


# ------------------------------------------------------------------------------ hostile input (issue 16)


def test_content_decides_the_format_not_the_file_name():
    """A PNG named .jpeg is read as the PNG it is, as the serving graph (which gets no file name) reads it."""
    png = cv2.imencode(".png", draw_fundus(width=300, height=200))[1].tobytes()
    info = probe(png, "a.jpeg")
    assert (info.format, info.width, info.height) == ("PNG", 300, 200)
    as_jpeg = preprocess_file("a.jpeg", (64,), data=png).images[64]
    assert np.array_equal(as_jpeg, preprocess_file("a.png", (64,), data=png).images[64])


def test_the_pixel_limit_is_checked_from_the_header_before_decoding():
    with pytest.raises(BadImage, match=r"image too large \(20000x20000 = 400.0 Mpx; the limit is 40 Mpx"):
        probe(png_claiming(20000, 20000), "bomb.png")  # the header alone: its 1 KB of data would not decode
    with pytest.raises(BadImage, match="image too large"):
        probe(tiff_claiming(30000, 30000), "bomb.tif")  # no pixel data at all: refused before OpenCV is asked
    assert probe(png_claiming(4000, 3000), "ok.png").width == 4000  # 12 Mpx: under the default limit
    # Configurable: a 300x200 photo against a 50000-pixel limit.
    photo = _jpeg(draw_fundus(width=300, height=200))
    with pytest.raises(BadImage, match=r"300x200 = 0.1 Mpx; the limit is 0.05 Mpx"):
        preprocess_file("a.jpeg", (64,), PreprocessConfig(max_pixels=50_000), data=photo)
    assert preprocess_file("a.jpeg", (64,), PreprocessConfig(max_pixels=60_000), data=photo).images[64].shape == (64, 64, 3)
    for bad in (0, 4095, True, 2.5e7, 2**31):
        with pytest.raises(ValueError, match="max_pixels must be an integer from 4096 to"):
            PreprocessConfig(max_pixels=bad)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_cut_short_and_closed_with_an_end_marker_is_refused(fraction, progressive):
    img = draw_fundus(width=640, height=480, seed=4)
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])[1]
    data = data.tobytes()
    cut = cut_jpeg(data, fraction)
    for reduction in (1, 2, 4):  # the check is made at the reduction the photo is decoded at
        with pytest.raises(BadImage, match="truncated JPEG"):
            decode(cut, reduction)
    with pytest.raises(BadImage, match="truncated JPEG"):
        preprocess_file("a.jpeg", (112,), data=cut)
    # The complete photo passes, and decode gives OpenCV's own pixels.
    assert np.array_equal(decode(data, 2), cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2))


def test_a_complete_jpeg_that_looks_cut_is_not_refused():
    """A bottom-right corner of exactly grey (what libjpeg fills missing blocks with) only makes the check look
    closer: the second decode shows the photo is whole."""
    img = draw_fundus(width=320, height=240)
    img[-40:, -40:] = 128
    data = _jpeg(img)
    assert (cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[-1, -1] == 128).all()  # a suspect
    assert decode(data, 1).shape == (240, 320, 3)
    with pytest.raises(BadImage, match="truncated JPEG"):
        decode(cut_jpeg(data, 0.6), 1)


@pytest.mark.parametrize("orientation", [2, 6])
def test_exif_orientation_is_ignored_as_the_serving_graph_ignores_it(orientation):
    """One rule on both paths: the pixels as stored (TensorFlow's decoders never read EXIF)."""
    img = draw_fundus(width=400, height=300, cx=150, cy=140, seed=5)  # off-centre: a turn or mirror shows
    plain = _jpeg(img)
    tagged = with_exif_orientation(plain, orientation)
    assert decode(tagged, 1).shape == (300, 400, 3)
    out = preprocess_file("a.jpeg", (112,), data=tagged)
    assert np.array_equal(out.images[112], preprocess_file("a.jpeg", (112,), data=plain).images[112])
    assert abs(out.disc.cx - 150.5) <= 2 and abs(out.disc.cy - 140.5) <= 2  # not moved by a rotation


def test_only_regular_files_are_read_and_up_to_a_size(tmp_path):
    photo = tmp_path / "a.jpeg"
    photo.write_bytes(_jpeg(draw_fundus()))
    assert read_image_file(photo, 1 << 20) == photo.read_bytes()
    (tmp_path / "link.jpeg").symlink_to(photo)  # a link to a regular file is read
    assert read_image_file(tmp_path / "link.jpeg", 1 << 20) == photo.read_bytes()
    (tmp_path / "z.jpeg").symlink_to("/dev/zero")
    with pytest.raises(BadImage, match=r"not a regular file \(device\)"):
        read_image_file(tmp_path / "z.jpeg", 1 << 20)
    os.mkfifo(tmp_path / "f.jpeg")  # opened non-blocking: no writer, no hang
    with pytest.raises(BadImage, match=r"not a regular file \(FIFO\)"):
        read_image_file(tmp_path / "f.jpeg", 1 << 20)
    with pytest.raises(BadImage, match="file too large"):
        read_image_file(photo, 100)
    with pytest.raises(FileNotFoundError):
        read_image_file(tmp_path / "missing.jpeg", 100)
    assert file_size_limit(40_000_000) > 3 * 40_000_000  # an uncompressed PNG under the limit still fits


def _strip_with_a_huge_disc():
    """A 2000x100 photo holding the middle of a 980-px disc: a crafted fit whose bounding square (1961 px a
    side, 3.8 Mpx) dwarfs the photo (0.2 Mpx)."""
    img = np.zeros((100, 2000, 3), np.uint8)
    cv2.circle(img, (1000, 50), 980, (60, 100, 200), -1)
    return cv2.imencode(".png", img)[1].tobytes()


def test_a_disc_whose_square_would_dwarf_the_pixel_limit_is_refused():
    """The pixel limit alone does not bound memory: the crop square of a crafted photo under it can be far
    larger (a 20000x1000 strip: 384 Mpx). Its square may hold at most twice max_pixels."""
    data = _strip_with_a_huge_disc()
    with pytest.raises(BadImage, match=r"its bounding square, 1961x1961 px, would hold more than twice max_pixels"):
        preprocess_file("a.png", (112,), PreprocessConfig(max_pixels=1_000_000), data=data)
    assert preprocess_file("a.png", (112,), PreprocessConfig(max_pixels=2_000_000), data=data).disc.r > 900
