"""What the host reads from an image file's bytes before DALI decodes it: the JPEG header check."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fastmae.data.encoded import jpeg_header_problem


def _jpeg(**kw) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (75, 101, 3), dtype=np.uint8))
    mode = kw.pop("mode", "RGB")
    buf = io.BytesIO()
    img.convert(mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _at(data: bytes, marker: bytes, offset: int, value: int) -> bytes:
    """``data`` with the byte ``offset`` after the first ``marker`` set to ``value``."""
    out = bytearray(data)
    out[data.index(marker) + offset] = value
    return bytes(out)


@pytest.mark.parametrize(
    "kw",
    [{}, {"subsampling": 0}, {"progressive": True}, {"optimize": True}, {"mode": "L"}, {"mode": "CMYK"},
     {"restart_marker_blocks": 2}, {"quality": 100}],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "baseline",
)  # fmt: skip
def test_decodable_jpegs_pass(kw):
    data = _jpeg(**kw)
    Image.open(io.BytesIO(data)).load()
    assert jpeg_header_problem(data) is None


def _bad_counts(data: bytes) -> bytes:
    out = bytearray(data)
    i = data.index(b"\xff\xc4") + 5
    out[i : i + 16] = b"\xff" * 16
    return bytes(out)


def _oversubscribed(data: bytes) -> bytes:
    """Three codes of length 1 (two fit), counts still adding up to the symbols that follow."""
    out = bytearray(data)
    i = data.index(b"\xff\xc4") + 5
    n = sum(out[i : i + 16])
    out[i : i + 16] = bytes([3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, n - 3])
    return bytes(out)


BROKEN = {
    # (how it is broken, what the check says)
    "dht_counts": (_bad_counts, "code counts do not fit"),
    "dht_oversubscribed": (_oversubscribed, "more codes than its lengths allow"),
    "dht_class": (lambda d: _at(d, b"\xff\xc4", 4, 0x25), "class/id byte is 0x25"),
    "dqt_id": (lambda d: _at(d, b"\xff\xdb", 4, 0x07), "precision/id byte is 0x07"),
    "sof_table": (lambda d: _at(d, b"\xff\xc0", 12, 3), "quantization table 3 is not defined"),
    "sof_sampling": (lambda d: _at(d, b"\xff\xc0", 11, 0x50), "sampling 0x50"),
    "sos_component": (lambda d: _at(d, b"\xff\xda", 5, 9), "names component 9"),
    "sos_count": (lambda d: _at(d, b"\xff\xda", 4, 2), "component count and length disagree"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_headers_the_decoders_refuse_are_named(case):
    """Each is refused by libjpeg (PIL here) as well: the loader confirms with PIL before skipping."""
    corrupt, says = BROKEN[case]
    data = corrupt(_jpeg())
    problem = jpeg_header_problem(data)
    assert problem is not None and says in problem, problem
    with pytest.raises(Exception):  # noqa: B017 (PIL raises OSError, SyntaxError or others)
        Image.open(io.BytesIO(data)).convert("RGB").load()


def test_what_other_checks_see_is_left_to_them():
    data = _jpeg()
    assert jpeg_header_problem(data[: data.index(b"\xff\xda") + 6]) is None  # cut short: truncation check
    assert jpeg_header_problem(b"\x89PNG\r\n\x1a\n" + data) is None  # not a JPEG
    assert jpeg_header_problem(b"") is None
