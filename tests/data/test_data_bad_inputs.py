"""The bad-input matrix, on both backends (DALI's CPU pipeline when DALI is installed).

Each case is a 4-entry file list: the odd file plus three copies of the lossless reference PNG it
was made from, batch 4, one step. Readable odd formats must come out as the reference image
converted to RGB (crop/flip of the odd file's own sample seed); unreadable files must be replaced
by the deterministic stand-in, counted and written to ``bad_files.txt``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data import DaliLoader, DataError, build_loader, dali_available, file_list_source, open_source
from fastmae.data.sampling import sample_generator
from fastmae.data.torch_loader import read_sample
from fastmae.data.transforms import augment, sample_params

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(), reason="needs DALI"))]
SIZE = 32
SEED = 3

# case -> how the reference image must look after decoding; tolerance on the mean |diff| in
# normalised units (0.018 ~ one grey level) covers JPEG re-encoding, palette quantisation and
# the DALI resize filter (seen: 0 to 0.012, palette 0.10); a wrong flip or crop gives > 0.17.
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
    diff = (x[slot] - _expected(odd_files, kind)).abs().mean().item()
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
