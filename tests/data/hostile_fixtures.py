"""Builders of hostile and careless inputs (issue 16), shared by the tests and benchmarks/hostile_inputs.py.

Everything here is cheap: a decompression bomb is a PNG *header* claiming a huge size (the checks must refuse it
before decoding), a cut JPEG is the first half of a real one plus ``FF D9``, an EXIF orientation is a 42-byte
APP1 segment put after the JPEG's start marker.
"""

from __future__ import annotations

import struct
import zlib


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` 8-bit RGB pixels, with ``idat`` as its only image data
    (default: a few compressed zero rows) and an IEND chunk: passes every check that reads only the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = idat or zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_bomb(width: int, height: int) -> bytes:
    """A real, valid black ``width`` x ``height`` RGB PNG, compressed row by row (20000x20000 is about 1.2 MB
    and decodes to 1.2 GB): for the benchmark, which measures what decoding would cost."""
    row = b"\0" + b"\0" * (3 * width)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return png_claiming(width, height, b"".join(parts))


def cut_jpeg(data: bytes, fraction: float = 0.5) -> bytes:
    """The first ``fraction`` of a JPEG with an end-of-image marker appended: libjpeg decodes it, fills the rest
    with grey and only warns."""
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """``jpeg`` with an EXIF APP1 segment (big-endian TIFF, one IFD entry: Orientation = ``orientation``) put
    right after its start-of-image marker, as a camera writes it."""
    entry = struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 0)
    body = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def tiff_claiming(width: int, height: int) -> bytes:
    """A little-endian TIFF header whose first IFD claims ``width`` x ``height`` (LONG values), no pixel data."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (277, 3, 1, 3)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd
