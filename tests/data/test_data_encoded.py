"""What the host reads from an image file's bytes before DALI decodes it: the JPEG header check."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fastmae.data.encoded import _walk_jpeg_headers, jpeg_header_problem


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


def test_the_check_never_raises_on_mutated_or_cut_jpegs():
    """It runs inside the loader's read of every file: on any bytes it says a problem or None (an
    empty scan header raised IndexError, and the file was then skipped without PIL's say)."""
    rng = np.random.default_rng(0)
    sources = [_jpeg(), _jpeg(progressive=True), _jpeg(mode="L")]
    for trial in range(3000):
        data = bytearray(sources[trial % 3])
        head = data.index(b"\xff\xda") + 16  # the headers and the start of the scan
        for _ in range(rng.integers(1, 6)):
            data[rng.integers(2, head)] = rng.integers(0, 256)
        cut = bytes(data[: rng.integers(2, len(data) + 1)]) if trial % 4 == 0 else bytes(data)
        said = _walk_jpeg_headers(cut)  # the walk itself (the public check also catches what it raises)
        assert said is None or isinstance(said, str)
    sos = _jpeg().index(b"\xff\xda")
    empty_scan = _jpeg()[:sos] + b"\xff\xda\x00\x02" + _jpeg()[sos + 2 :]
    assert "scan header" in jpeg_header_problem(empty_scan)
