"""What the host learns from an image file's bytes before DALI decodes it: its size from the header
(JPEG frames read directly, a third of PIL's cost), whether a JPEG looks truncated, whether a
PGM/PPM needs PIL's rescaling; and the fall-backs the DALI loader feeds instead (a PNG re-encoded
by PIL, a read's error as a value).
"""

from __future__ import annotations

import io
import struct

from PIL import Image

from fastmae.data.transforms import header_size, load_rgb

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"


def describe(exc: BaseException, path: str | None = None) -> str:
    """``Type: message`` of a failed read, without ``path`` where the message repeats it (PIL's
    "cannot identify image file '<path>'"): the report and the log line name the file already."""
    text = str(exc)
    if path:
        text = text.replace(repr(path), "").replace(path, "").strip().rstrip(":").strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# start-of-frame markers (baseline, progressive, lossless, ...) carry the image size
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's frame header, or None where the marker walk fails."""
    pos, end = 2, len(data) - 9
    while pos < end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF:
            h, w = struct.unpack_from(">HH", data, pos + 5)
            return (h, w) if h and w else None
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def encoded_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` from the encoded bytes' header; raises on what PIL cannot identify.

    JPEG frame headers are read directly (a third of PIL's cost, which matters at several
    thousand images per second on one host thread); anything else goes through PIL.
    """
    if not data:
        raise OSError("empty file")
    if data.startswith(_JPEG_SOI):
        size = jpeg_size(data)
        if size is not None:
            return size
    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise OSError("cannot identify image file") from None
    with img:
        return header_size(img)


_PNM_MAXVAL_MAGIC = (b"P2", b"P3", b"P5", b"P6")  # grey / colour maps, ASCII or binary


def pnm_rescaled(data: bytes) -> bool:
    """A PGM/PPM whose maxval is not 255 or 65535: PIL scales its samples to the full range,
    DALI's decoder does not for binary files (a 12-bit PGM comes out nearly black; ASCII ones it
    scales, with other rounding), so such a file is decoded on the host."""
    if data[:2] not in _PNM_MAXVAL_MAGIC:
        return False
    tokens: list[bytes] = []
    pos = 2
    while len(tokens) < 3 and pos < min(len(data), 4096):
        c = data[pos : pos + 1]
        if c == b"#":  # comment to end of line
            end = data.find(b"\n", pos)
            pos = len(data) if end < 0 else end + 1
        elif c.isspace():
            pos += 1
        else:
            start = pos
            while pos < len(data) and not data[pos : pos + 1].isspace() and data[pos : pos + 1] != b"#":
                pos += 1
            tokens.append(data[start:pos])
    if len(tokens) < 3 or not tokens[2].isdigit():
        return False  # a broken header: the header check and the decoders decide
    return int(tokens[2]) not in (255, 65535)


def looks_truncated(data: bytes) -> bool:
    return data.startswith(_JPEG_SOI) and not data.rstrip(b"\x00\r\n ").endswith(_JPEG_EOI)


def png_bytes(path: str) -> bytes:
    buf = io.BytesIO()
    load_rgb(path).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def read_bytes(path: str) -> bytes | Exception:
    try:
        with open(path, "rb") as f:
            return f.read()
    except Exception as exc:  # reported by the caller, like any unreadable file
        return exc
