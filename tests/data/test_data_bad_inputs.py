"""The bad-input matrix, on both backends (DALI's CPU pipeline when DALI is installed).

Each case is a 4-entry file list: the odd file plus three copies of the lossless reference PNG it
was made from, batch 4, one step. Readable odd formats must come out as the reference image
converted to RGB (crop/flip of the odd file's own sample seed); unreadable files must be replaced
by the deterministic stand-in, counted and written to ``bad_files.txt``.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastmae.data.dali as dali_module
from fastmae.data import DaliLoader, DataError, build_loader, dali_available, file_list_source, open_source
from fastmae.data.sampling import sample_generator
from fastmae.data.torch_loader import read_sample
from fastmae.data.transforms import augment, load_rgb, sample_params

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs DALI"))]
SIZE = 32
SEED = 3

# case -> how the reference image must look after decoding; tolerance on the mean |diff| in
# normalised units (0.018 ~ one grey level) covers JPEG re-encoding, palette quantisation and
# the DALI resize filter (seen: 0 to 0.012, palette 0.10); a wrong flip or crop gives > 0.17.
# The rgba file is semi-transparent (tests/data/conftest.py): its alpha must be dropped.
READABLE = {
    "reference": ("rgb", 0.015),
    "rgba": ("rgb", 0.015),
    "png16rgb": ("rgb", 0.015),
    "cmyk": ("rgb", 0.04),
    "gray": ("gray", 0.04),
    "png16": ("gray", 0.015),
    "palette": ("rgb", 0.15),  # PIL's adaptive palette is coarse: ~0.10 here; a wrong flip is 0.37
    "gif": ("rgb", 0.05),
}
# Lossless files: the torch backend decodes them with PIL and resizes exactly as ``_expected``
# does, so its output equals the expected image bit for bit (DALI's resize filter differs).
LOSSLESS = {"reference", "rgba", "png16rgb", "png16"}
UNREADABLE = ["truncated", "corrupt", "empty", "text"]


def _list_source(tmp_path, odd_files, case, check_files=True):
    root = odd_files["reference"].parent
    lst = tmp_path / "list.txt"
    lst.write_text(f"{case}{odd_files[case].suffix if case != 'missing' else '.jpg'} 1\n" + "reference.png 2\n" * 3)
    return file_list_source(root, lst, check_files=check_files)


def _run(backend, source, report_dir):
    loader = build_loader(
        backend, source, batch_size=4, image_size=SIZE, seed=SEED, num_workers=0, report_dir=report_dir
    )
    loader.set_epoch(0)
    batches = [(x.clone(), y.clone()) for x, y in loader]
    assert len(batches) == 1
    return loader, batches[0]


def _slot(loader, index: int) -> int:
    return int(np.flatnonzero(loader.plan.batch_indices(0, 0) == index)[0])


def _expected(odd_files, kind: str, index: int = 0, attempt: int = 0) -> torch.Tensor:
    ref = Image.open(odd_files["reference"]).convert("RGB")
    if kind == "gray":
        ref = ref.convert("L").convert("RGB")
    p = sample_params(ref.height, ref.width, sample_generator(SEED, 0, index, attempt))
    return augment(ref, p, SIZE, use_torchvision=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(READABLE))
def test_odd_formats_become_rgb(tmp_path, odd_files, backend, case):
    kind, tol = READABLE[case]
    loader, (x, y) = _run(backend, _list_source(tmp_path, odd_files, case), tmp_path / "run")
    assert x.shape == (4, 3, SIZE, SIZE) and torch.isfinite(x).all()
    assert loader.bad_files.count == 0 and not (tmp_path / "run" / "bad_files.txt").exists()
    slot = _slot(loader, 0)
    assert y[slot] == 1
    want = _expected(odd_files, kind)
    if backend == "torch" and case in LOSSLESS:
        assert torch.equal(x[slot], want), f"{case}: max |diff| {(x[slot] - want).abs().max().item():.3g}"
    diff = (x[slot] - want).abs().mean().item()
    assert diff < tol, f"{case}: mean |diff| {diff:.4f} >= {tol}"
    if kind == "gray":  # three equal channels before normalisation
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        raw = x[slot] * std + mean
        assert (raw[0] - raw[1]).abs().max() < 0.02 and (raw[1] - raw[2]).abs().max() < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_files_are_skipped_and_reported(tmp_path, odd_files, backend, case):
    source = _list_source(tmp_path, odd_files, case)
    loader, (x, y) = _run(backend, source, tmp_path / "run")
    assert x.shape == (4, 3, SIZE, SIZE) and torch.isfinite(x).all()  # batch shape kept
    bad_path = str(odd_files[case])
    assert loader.bad_files.paths == [bad_path]
    lines = (tmp_path / "run" / "bad_files.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(bad_path + "\t")
    # the slot holds the deterministic stand-in: what the reference reader gives for it
    slot = _slot(loader, 0)
    want, label, bad = read_sample(source.samples, SEED, 0, 0, SIZE)
    assert [p for p, _ in bad] == [bad_path] and y[slot] == label == 2
    tol = 0 if backend == "torch" else 0.03
    assert (x[slot] - want).abs().mean().item() <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbled_jpeg(tmp_path, odd_files, backend):
    """Entropy data overwritten: PIL refuses it (skipped); DALI's decoder decodes it with a warning."""
    loader, (x, _) = _run(backend, _list_source(tmp_path, odd_files, "garbled"), tmp_path / "run")
    assert x.shape == (4, 3, SIZE, SIZE) and torch.isfinite(x).all()
    assert loader.bad_files.count == (1 if backend == "torch" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check_files", [True, False])
def test_listed_but_missing_file(tmp_path, odd_files, backend, check_files):
    source = _list_source(tmp_path, odd_files, "missing", check_files=check_files)
    assert len(source) == (3 if check_files else 4)
    if check_files:  # 3 samples do not fill a batch of 4: use 3 x 1
        loader = build_loader(backend, source, batch_size=1, image_size=SIZE, num_workers=0, report_dir=tmp_path)
        assert sum(1 for _ in loader) == 3
    else:
        loader, _ = _run(backend, source, tmp_path)
    missing = str(odd_files["reference"].parent / "missing.jpg")
    assert loader.bad_files.paths == [missing]
    reason = (tmp_path / "bad_files.txt").read_text().split("\t")[1].strip()
    assert reason == "missing" if check_files else "FileNotFoundError" in reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_file_unreadable_is_an_error_not_a_hang(tmp_path, odd_files, backend):
    root = odd_files["reference"].parent
    lst = tmp_path / "list.txt"
    lst.write_text("empty.jpg\ntext.jpg\ntruncated.jpg\ncorrupt.jpg\n")
    loader = build_loader(backend, open_source(root, lst), batch_size=2, image_size=SIZE, num_workers=0)
    with pytest.raises(DataError, match="unreadable images in a row"):
        for _ in loader:
            pass


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "lines,match",
    [
        ("../escape.jpg\n", "escapes the data root"),
        ("reference.png x\n", "bad label 'x'"),
        ("# only a comment\n", "gives no images"),
    ],
)
def test_source_errors_before_training(tmp_path, odd_files, backend, lines, match):
    root = odd_files["reference"].parent
    lst = tmp_path / "list.txt"
    lst.write_text(lines)
    with pytest.raises(DataError, match=match) as err:
        build_loader(backend, open_source(root, lst), batch_size=1, image_size=SIZE)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        build_loader(backend, open_source(tmp_path / "no_such_root"), batch_size=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        build_loader(backend, open_source(tmp_path / "empty"), batch_size=1)


def test_dali_backend_without_dali_is_a_one_line_error(monkeypatch, demo_root):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.setitem(sys.modules, "nvidia.dali.fn", None)
    with pytest.raises(DataError, match="needs NVIDIA DALI.*pip install nvidia-dali") as err:
        DaliLoader(open_source(demo_root), batch_size=2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("batch_size", [13, 1])  # 13 files: all in one batch, or one per step
@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_matrix_in_one_epoch(tmp_path, odd_files, backend, batch_size):
    """Every odd file in one source, with workers/threads: one report, constant batch shape."""
    source = open_source(odd_files["reference"].parent)  # the folder scan: all 13 files
    assert len(source) == 13
    loader = build_loader(backend, source, batch_size=batch_size, image_size=SIZE, num_workers=2, report_dir=tmp_path)
    loader.set_epoch(0)
    shapes = {tuple(x.shape) for x, _ in loader}
    loader.close()
    assert shapes == {(batch_size, 3, SIZE, SIZE)}
    unreadable = {"truncated", "corrupt", "empty", "text"} | ({"garbled"} if backend == "torch" else set())
    want = sorted(str(odd_files[c]) for c in unreadable)
    assert sorted(loader.bad_files.paths) == want
    assert sorted(line.split("\t")[0] for line in (tmp_path / "bad_files.txt").read_text().splitlines()) == want


def _with_references(tmp_path, odd_files, name: str, data: bytes):
    """A 4-entry list in ``tmp_path``: ``name`` (label 1) plus three copies of the reference PNG."""
    (tmp_path / name).write_bytes(data)
    (tmp_path / "reference.png").write_bytes(odd_files["reference"].read_bytes())
    lst = tmp_path / "list.txt"
    lst.write_text(f"{name} 1\n" + "reference.png 2\n" * 3)
    return file_list_source(tmp_path, lst)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_rotated_tiff_is_used_as_stored(tmp_path, odd_files, backend, orientation):
    """No EXIF rotation on either backend, TIFF included (PIL's TIFF plugin rotates on load and
    reports the rotated size: the DALI crop window then fell outside the decoded image)."""
    buf = io.BytesIO()
    Image.open(odd_files["reference"]).save(buf, format="TIFF", tiffinfo={274: orientation})
    source = _with_references(tmp_path, odd_files, "rotated.tif", buf.getvalue())
    loader, (x, y) = _run(backend, source, tmp_path / "run")
    assert loader.bad_files.count == 0
    if backend == "dali":  # decoded by DALI itself, first time
        assert loader.rebuilds == 0 and not loader._host_decode
    slot = _slot(loader, 0)
    assert y[slot] == 1
    diff = (x[slot] - _expected(odd_files, "rgb")).abs().mean().item()
    assert diff < 0.015, diff


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
def test_dali_size_disagreement_is_decoded_on_the_host(tmp_path, odd_files, monkeypatch):
    """A file DALI decodes to another size than the host's header gives (as rotated TIFFs did)
    is not a nameless pipeline error: the probe finds it and it is decoded on the host."""
    real = dali_module.encoded_size

    def wrong_tiff_size(data: bytes) -> tuple[int, int]:  # too big for any crop window to fit
        h, w = real(data)
        return (h + 100, w + 100) if data[:4] == b"II*\x00" else (h, w)

    monkeypatch.setattr(dali_module, "encoded_size", wrong_tiff_size)
    buf = io.BytesIO()
    Image.open(odd_files["reference"]).save(buf, format="TIFF", tiffinfo={274: 6})
    source = _with_references(tmp_path, odd_files, "rotated.tif", buf.getvalue())
    loader, (x, _) = _run("dali", source, tmp_path / "run")
    assert loader.bad_files.count == 0 and loader.rebuilds == 1
    assert [source.samples[j][0] for j in loader._host_decode] == [str(tmp_path / "rotated.tif")]
    assert (x[_slot(loader, 0)] - _expected(odd_files, "rgb")).abs().mean().item() < 0.015


def _pnm(magic: bytes, maxval: int, gray: np.ndarray) -> bytes:
    """A binary PGM (P5) or PPM (P6) of ``gray`` (0..1), scaled to ``maxval``."""
    a = np.round(gray * maxval)
    if magic == b"P6":
        a = np.stack([a, a[:, ::-1], a[::-1]], -1)
    head = b"%s\n# a comment\n%d %d\n%d\n" % (magic, gray.shape[1], gray.shape[0], maxval)
    return head + a.astype(">u2" if maxval > 255 else "u1").tobytes()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magic,maxval", [(b"P5", 4095), (b"P5", 15), (b"P6", 1023)])
def test_pnm_maxval_is_rescaled(tmp_path, odd_files, backend, magic, maxval):
    """PIL scales a PGM/PPM's samples from maxval to the full range; DALI's decoder does not,
    so such files are decoded on the host: both backends give PIL's image."""
    yy, xx = np.mgrid[0:48, 0:64]
    data = _pnm(magic, maxval, (xx + yy) / (63 + 47))
    source = _with_references(tmp_path, odd_files, "deep.pnm", data)
    loader, (x, y) = _run(backend, source, tmp_path / "run")
    assert loader.bad_files.count == 0
    img = Image.open(tmp_path / "deep.pnm")
    rgb = load_rgb(tmp_path / "deep.pnm")
    assert np.asarray(rgb).max() >= 250  # full range, whatever the maxval
    want = augment(rgb, sample_params(img.height, img.width, sample_generator(SEED, 0, 0)), SIZE, use_torchvision=False)
    slot = _slot(loader, 0)
    assert y[slot] == 1
    diff = (x[slot] - want).abs().mean().item()
    assert diff < 0.015, diff


@pytest.mark.parametrize(
    "backend,num_workers", [("torch", 0), ("torch", 1), pytest.param("dali", 0, marks=BACKENDS[1].marks)]
)
def test_giving_up_is_one_line_and_the_report_lists_the_files(tmp_path, backend, num_workers):
    """All files unreadable: a one-line DataError that counts the distinct files, with every one
    of them already in the report (also from a DataLoader worker)."""
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
    loader = build_loader(
        backend,
        open_source(tmp_path),
        batch_size=2,
        image_size=SIZE,
        num_workers=num_workers,
        report_dir=tmp_path / "run",
    )
    with pytest.raises(DataError, match=r"^4 unreadable images in a row standing in for ") as err:
        for _ in loader:
            pass
    loader.close()
    assert "\n" not in str(err.value)
    want = sorted(str(tmp_path / f"{i}.jpg") for i in range(4))
    assert sorted(loader.bad_files.paths) == want
    assert sorted(line.split("\t")[0] for line in (tmp_path / "run" / "bad_files.txt").read_text().splitlines()) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_file_with_non_utf8_name(tmp_path, odd_files, backend):
    name = os.fsdecode(b"caf\xe9.jpg")  # a Latin-1 name: a str with a surrogate
    (tmp_path / name).write_bytes(b"")
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(odd_files["reference"].read_bytes())
    source = open_source(tmp_path)
    loader, (x, _) = _run(backend, source, tmp_path / "run")
    assert x.shape == (4, 3, SIZE, SIZE)
    assert loader.bad_files.paths == [str(tmp_path / name)]
    assert (tmp_path / "run" / "bad_files.txt").read_bytes().startswith(os.fsencode(str(tmp_path / name)) + b"\t")


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
def test_dali_skips_jpegs_with_refused_headers_without_a_rebuild(tmp_path, odd_files):
    """A quarter of the files with Huffman tables, a quantization table or a scan header the
    decoders refuse: the host's header check (confirmed by PIL) skips them before they reach DALI,
    so no pipeline run fails and none is rebuilt (each costs seconds on a GPU), and the batches are
    the reference loader's."""
    from tests.data.test_data_encoded import BROKEN

    good = odd_files["reference"].read_bytes()
    jpeg = Image.open(odd_files["reference"]).convert("RGB")
    buf = io.BytesIO()
    jpeg.save(buf, "JPEG", quality=90)
    for i in range(32):
        name = list(BROKEN)[i // 4 % len(BROKEN)]
        path = tmp_path / (f"{i:02d}.jpg" if i % 4 == 0 else f"{i:02d}.png")
        path.write_bytes(BROKEN[name][0](buf.getvalue()) if i % 4 == 0 else good)
    source = open_source(tmp_path)
    batches = {}
    for backend in ("torch", "dali"):
        loader = build_loader(backend, source, batch_size=8, image_size=32, seed=0, num_workers=1)
        batches[backend] = [x.clone() for x, _ in loader]
        loader.close()
    assert loader.rebuilds == 0 and loader.bad_files.count == 8
    assert len(batches["dali"]) == len(batches["torch"]) == 4
    for a, b in zip(batches["dali"], batches["torch"], strict=True):
        assert (a - b).abs().mean().item() < 0.015


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
def test_dali_trains_through_a_mostly_corrupt_data_set(tmp_path, odd_files, monkeypatch):
    """70% of 2000 files with corrupt Huffman tables that pass the host's checks (the header check
    is off here, as for a corruption it does not see): each one in flight fails DALI's whole
    pipeline. A rebuild finds the bad files in flight, but ~70% of their
    stand-ins are bad too: ~log(45) / log(1 / 0.7) = 11 rebuilds before the first batch of 64,
    over a former cap of 8 failures in a row, which stopped such a run at its first step where the
    reference loader trains through. Now every failure is diagnosed and the pipeline rebuilt as
    often as it takes, and the batch is the reference loader's."""

    monkeypatch.setattr(dali_module, "jpeg_header_problem", lambda data: None)
    rng = np.random.default_rng(0)
    corrupt, good = odd_files["corrupt"].read_bytes(), odd_files["reference"].read_bytes()
    for i, bad in enumerate(rng.permutation(2000) < 1400):
        (tmp_path / (f"{i:04d}.jpg" if bad else f"{i:04d}.png")).write_bytes(corrupt if bad else good)
    source = open_source(tmp_path)
    batches = {}
    for backend in ("torch", "dali"):
        loader = build_loader(backend, source, batch_size=64, image_size=32, seed=0, num_workers=1)
        batches[backend] = next(iter(loader))[0]
        loader.close()
    assert loader.rebuilds > 8 and loader.bad_files.count > 64
    assert batches["dali"].shape == (64, 3, 32, 32)
    assert (batches["dali"] - batches["torch"]).abs().mean().item() < 0.015


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
def test_dali_resumed_knows_the_bad_files_its_run_found(tmp_path, odd_files, monkeypatch):
    """A resumed run reads its bad-file report back: DALI skips those files at once instead of
    failing a pipeline run and rebuilding for each again (seconds a rebuild on a GPU), and the
    batches are the same. (The header check is off: files it does not see.)"""
    monkeypatch.setattr(dali_module, "jpeg_header_problem", lambda data: None)
    data = tmp_path / "data"
    data.mkdir()
    corrupt, good = odd_files["corrupt"].read_bytes(), odd_files["reference"].read_bytes()
    for i in range(24):
        (data / (f"{i:02d}.jpg" if i % 4 == 0 else f"{i:02d}.png")).write_bytes(corrupt if i % 4 == 0 else good)
    source, run = open_source(data), tmp_path / "run"
    first = DaliLoader(source, 4, 32, num_threads=1, report_dir=run)
    a = [x.clone() for x, _ in first]
    first.close()
    assert first.rebuilds > 0 and first.bad_files.count == 6
    again = DaliLoader(source, 4, 32, num_threads=1, report_dir=run)
    again.set_epoch(0)
    b = [x.clone() for x, _ in again]
    again.close()
    assert again.rebuilds == 0 and len(a) == len(b) == 6
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_dali_error_is_told_by_its_telling_lines():
    """DALI's message for a file it cannot decode (as DALI 2.4 words it): the operator and the
    cause, not its first line ("Critical error in pipeline:")."""
    from fastmae.data.dali import _error_line

    message = (
        "Critical error in pipeline:\nCritical error in pipeline:\nError in CPU operator "
        "`nvidia.dali.fn.decoders.image`,\nwhich was used in the pipeline definition with the following "
        'traceback:\n\n  File "<stdin>", line 7, in p\n\nencountered:\n\nFailed to decode sample #0 : \n'
        "Current pipeline object is no longer valid.\nCurrent pipeline object is no longer valid."
    )
    assert _error_line(RuntimeError(message)) == (
        "Error in CPU operator `nvidia.dali.fn.decoders.image`; Failed to decode sample #0"
    )
    assert _error_line(RuntimeError("")) == "RuntimeError"
    # defined in a file, the traceback has a source line after its File line (that was taken as the cause)
    in_file = message.replace(
        '  File "<stdin>", line 7, in p\n',
        '  File "/x/dali.py", line 140, in pipe\n    images = fn.decoders.image(encoded, device="cpu")\n',
    )
    assert _error_line(RuntimeError(in_file)) == _error_line(RuntimeError(message))


def test_bad_file_reports_merge_and_discard(tmp_path):
    """At a run's end the ranks' reports (and one from a resumed run's other world size) are joined
    into bad_files.txt, each file once; a torn last line (a kill mid-write) is left out. A fresh
    run clears them all first."""
    from fastmae.data import BadFileReport

    BadFileReport(tmp_path, rank=0, world_size=2).extend([("a.jpg", "empty file"), ("b.jpg", "truncated")])
    BadFileReport(tmp_path, rank=1, world_size=2).add("b.jpg", "truncated")
    with open(tmp_path / "bad_files.rank3.txt", "w") as f:  # an earlier run's 4th rank, killed mid-line
        f.write("c.jpg\tnot an image\nd.jp")
    count, path = BadFileReport.merge(tmp_path)
    assert (count, path) == (3, tmp_path / "bad_files.txt")
    assert path.read_text().splitlines() == ["a.jpg\tempty file", "b.jpg\ttruncated", "c.jpg\tnot an image"]
    assert BadFileReport.merge(tmp_path)[0] == 3  # again, the merged file among them: the same
    BadFileReport.discard(tmp_path)
    assert not list(tmp_path.iterdir())
    assert BadFileReport.merge(tmp_path) == (0, None)
    one = BadFileReport(tmp_path)  # a single process: its own report is the list
    one.add("e.jpg", "empty file")
    assert BadFileReport.merge(tmp_path) == (1, tmp_path / "bad_files.txt")
    BadFileReport.discard(tmp_path)
    BadFileReport(tmp_path, rank=1, world_size=2).add("f.jpg", "truncated")  # one rank alone met any
    assert BadFileReport.merge(tmp_path) == (1, tmp_path / "bad_files.txt")
    assert (tmp_path / "bad_files.txt").read_text() == "f.jpg\ttruncated\n"


@pytest.mark.skipif(not dali_available(), reason="needs DALI")
def test_dali_has_pil_settle_a_doubtful_file_once(tmp_path, odd_files, monkeypatch):
    """A file the host's checks doubt and PIL reads (the header check is stricter than libjpeg in
    places) is fed to DALI, and PIL's decode (~0.3-1 ms) is not repeated each time it is drawn."""
    for i in range(8):
        (tmp_path / f"{i}.jpg").write_bytes(odd_files["gray"].read_bytes())
    reads = []
    monkeypatch.setattr(dali_module, "jpeg_header_problem", lambda data: "in doubt")
    monkeypatch.setattr(dali_module, "load_rgb", lambda path: reads.append(path) or load_rgb(path))
    loader = DaliLoader(open_source(tmp_path), 4, 32, num_threads=1)
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert len([x for x, _ in loader]) == 2
    loader.close()
    assert sorted(reads) == sorted(str(p) for p in tmp_path.glob("*.jpg"))  # once each, over 3 epochs
    assert loader.bad_files.count == 0 and loader.rebuilds == 0
