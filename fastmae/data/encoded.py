"""What the host learns from an image file's bytes before DALI decodes it: its size from the header
(JPEG frames read directly, a third of PIL's cost), whether a JPEG looks truncated, whether a
PGM/PPM needs PIL's rescaling; and the fall-backs the DALI loader feeds instead (a PNG re-encoded
by PIL, a read's error as a value).
"""

from __future__ import annotations

import functools
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


_LOSSLESS_SOF = frozenset({0xC3, 0xC7, 0xCB, 0xCF})  # no quantization tables


@functools.lru_cache(maxsize=256)
def _huffman_table_problem(seg: bytes) -> str | None:
    """A DHT segment's tables as libjpeg-turbo builds them (``jpeg_make_d_derived_tbl``). Cached:
    a data set's files mostly share an encoder's standard tables (7 us of the 12 each)."""
    i = 0
    while i < len(seg):
        if i + 17 > len(seg):
            return "a Huffman table runs past its segment"
        tc, th = seg[i] >> 4, seg[i] & 15
        if tc > 1 or th > 3:
            return f"a Huffman table's class/id byte is {seg[i]:#04x}"
        counts = seg[i + 1 : i + 17]
        n = sum(counts)
        if n > 256 or i + 17 + n > len(seg):
            return "a Huffman table's code counts do not fit its segment"
        code = 0  # canonical codes: no length may run out of codes (all ones is reserved)
        for length, count in enumerate(counts, 1):
            code += count
            if code >= 1 << length:
                return "a Huffman table has more codes than its lengths allow"
            code <<= 1
        if tc == 0 and any(v > 15 for v in seg[i + 17 : i + 17 + n]):
            return "a DC Huffman table has a symbol over 15"
        i += 17 + n
    return None


def jpeg_header_problem(data: bytes) -> str | None:
    """What in a JPEG's headers, up to its first scan, the decoders refuse, or None.

    Checks like those libjpeg-turbo (DALI's CPU decoder) makes before decoding a scan, a failure of
    which stops a whole DALI pipeline run (DALI has no per-sample error) and costs a rebuild
    (seconds on a GPU): quantization and Huffman table headers and lengths, Huffman code counts,
    the frame's and the first scan's component lists, the scan's components' quantization tables.
    Stricter than libjpeg in places (every Huffman table, not only those a scan uses; quantization
    precision 0 or 1): the loader has PIL decode a flagged file once and feeds it if that works. Bytes that
    are not a JPEG, or end before the scan, are None here (other checks see them). Garbage in the
    entropy-coded data is not seen: the decoders decode it with a warning.
    """
    try:
        return _walk_jpeg_headers(data)
    except Exception as exc:  # never raise from a read's check: PIL then decides, as for any doubt
        return f"the header walk failed ({type(exc).__name__})"


def _walk_jpeg_headers(data: bytes) -> str | None:
    if not data.startswith(_JPEG_SOI):
        return None
    quant: set[int] = set()
    frame: dict[int, int] | None = None  # component id -> its quantization table
    lossless = False
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return "no marker where a header segment is due"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = struct.unpack_from(">H", data, pos + 2)[0]
        seg = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(seg) != length - 2:
            return None  # cut short: the truncation check decides
        if marker == 0xDB:  # DQT: (precision/id, 64 or 128 bytes) per table
            i = 0
            while i < len(seg):
                pq, tq = seg[i] >> 4, seg[i] & 15
                if pq > 1 or tq > 3:
                    return f"a quantization table's precision/id byte is {seg[i]:#04x}"
                quant.add(tq)
                i += 1 + 64 * (1 + pq)
            if i != len(seg):
                return "the quantization tables do not fit their segment"
        elif marker == 0xC4:  # DHT
            problem = _huffman_table_problem(seg)
            if problem:
                return problem
        elif marker in _JPEG_SOF:
            nf = seg[5] if len(seg) > 5 else 0
            if nf == 0 or len(seg) != 6 + 3 * nf:
                return "the frame header's component count and length disagree"
            frame, lossless = {}, marker in _LOSSLESS_SOF
            for k in range(6, len(seg), 3):
                hv, tq = seg[k + 1], seg[k + 2]
                if not (1 <= hv >> 4 <= 4 and 1 <= hv & 15 <= 4) or tq > 3:
                    return f"frame component {seg[k]} has sampling {hv:#04x}, table {tq}"
                frame[seg[k]] = tq
        elif marker == 0xDA:  # SOS: the headers end at the first scan
            if frame is None:
                return "a scan before the frame header"
            ns = seg[0] if seg else 0
            if not 1 <= ns <= 4 or len(seg) != 4 + 2 * ns:
                return "the scan header's component count and length disagree"
            for k in range(1, 1 + 2 * ns, 2):
                if seg[k] not in frame:
                    return f"the scan names component {seg[k]}, which the frame does not have"
                if not lossless and frame[seg[k]] not in quant:
                    return f"component {seg[k]}'s quantization table {frame[seg[k]]} is not defined"
            return None
        pos += 2 + length
    return None


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
