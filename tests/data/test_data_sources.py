"""Sources (file list, ImageFolder, scan), their one-line errors, and the bad-file report."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fastmae.data import (
    BadFileReport,
    DataError,
    file_list_source,
    folder_scan_source,
    image_folder_source,
    open_source,
)
from fastmae.data.sources import PackedSamples


def _touch_images(root: Path, rels: list[str]) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")  # sources never decode; content does not matter here


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_file_list_labels_comments_blank_lines(tmp_path):
    _touch_images(tmp_path, ["a/1.jpg", "b/2.JPEG", "c d/3.png"])
    lst = tmp_path / "train.txt"
    lst.write_text("# header\n\na/1.jpg 3\n  b/2.JPEG  \nc d/3.png 0\n")
    src = file_list_source(tmp_path, lst)
    assert src.kind == "list"
    assert src.samples == [
        (str(tmp_path / "a/1.jpg"), 3),
        (str(tmp_path / "b/2.JPEG"), -1),
        (str(tmp_path / "c d/3.png"), 0),
    ]
    assert open_source(tmp_path, lst).samples == src.samples


def test_file_list_absolute_path_inside_root_is_accepted(tmp_path):
    _touch_images(tmp_path, ["a.jpg"])
    lst = tmp_path / "l.txt"
    lst.write_text(f"{tmp_path / 'a.jpg'} 1\n")
    assert file_list_source(tmp_path, lst).samples == [(str(tmp_path / "a.jpg"), 1)]


@pytest.mark.parametrize("line", ["../outside.jpg", "a/../../outside.jpg", "/etc/passwd"])
def test_file_list_path_escaping_root(tmp_path, line):
    root = tmp_path / "root"
    _touch_images(root, ["a.jpg"])
    _touch_images(tmp_path, ["outside.jpg"])
    lst = tmp_path / "l.txt"
    lst.write_text(f"a.jpg\n{line}\n")
    with pytest.raises(DataError, match="escapes the data root") as err:
        file_list_source(root, lst)
    assert f"{lst}:2" in _one_line(err)


@pytest.mark.parametrize("line,match", [("a.jpg cat", "bad label 'cat'"), ("a.jpg -3", "must be >= 0")])
def test_file_list_bad_label(tmp_path, line, match):
    _touch_images(tmp_path, ["a.jpg"])
    lst = tmp_path / "l.txt"
    lst.write_text(f"a.jpg 1\n{line}\n")
    with pytest.raises(DataError, match=match) as err:
        file_list_source(tmp_path, lst)
    assert ":2:" in _one_line(err)


def test_file_list_missing_file_is_skipped_and_kept(tmp_path, caplog):
    _touch_images(tmp_path, ["a.jpg", "b.jpg"])
    lst = tmp_path / "l.txt"
    lst.write_text("a.jpg 0\ngone.jpg 1\nb.jpg 2\n" + "".join(f"gone{i}.jpg\n" for i in range(5)))
    src = file_list_source(tmp_path, lst)
    assert [label for _, label in src.samples] == [0, 2]
    assert src.missing == [str(tmp_path / "gone.jpg"), *(str(tmp_path / f"gone{i}.jpg") for i in range(5))]
    # one line for all of them, naming the first few
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"6 files listed in {lst} are missing: left out of the data set ({tmp_path / 'gone.jpg'}, ")
    assert "gone1.jpg, ..." in line and "gone4.jpg" not in line
    # without the up-front check the file stays in the source (the loader reports it when read)
    assert len(file_list_source(tmp_path, lst, check_files=False)) == 8


def test_file_list_all_missing_or_empty(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("gone.jpg\n")
    with pytest.raises(DataError, match="gives no images .1 listed files are missing") as err:
        file_list_source(tmp_path, lst)
    _one_line(err)
    lst.write_text("# nothing\n\n")
    with pytest.raises(DataError, match="gives no images"):
        file_list_source(tmp_path, lst)
    with pytest.raises(DataError, match="does not exist"):
        file_list_source(tmp_path, tmp_path / "nope.txt")


def test_image_folder_sorted_classes_recursive(tmp_path):
    _touch_images(tmp_path, ["zebra/1.jpg", "ant/x/2.jpg", "ant/1.png", "mole/readme.txt", "top.jpg"])
    src = image_folder_source(tmp_path)
    assert src.classes == ["ant", "mole", "zebra"]
    assert [(os.path.relpath(p, tmp_path), y) for p, y in src.samples] == [
        ("ant/1.png", 0),
        ("ant/x/2.jpg", 0),
        ("zebra/1.jpg", 2),
    ]


def test_folder_scan_recursive_unlabelled(tmp_path):
    _touch_images(tmp_path, ["b/2.jpg", "a.webp", "b/c/3.tiff", "notes.txt", "b/4.gif"])
    src = folder_scan_source(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in src.paths] == ["a.webp", "b/2.jpg", "b/c/3.tiff"]
    assert {y for _, y in src.samples} == {-1}


def test_open_source_auto(tmp_path):
    _touch_images(tmp_path / "tree", ["c1/a.jpg", "c2/b.jpg"])
    _touch_images(tmp_path / "flat", ["a.jpg", "sub/b.jpg"])
    assert open_source(tmp_path / "tree").kind == "imagefolder"
    assert open_source(tmp_path / "flat").kind == "scan"
    with pytest.raises(DataError, match="unknown source kind"):
        open_source(tmp_path / "flat", kind="lmdb")


def test_missing_root_and_empty_source(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        open_source(tmp_path / "nope")
    _one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        folder_scan_source(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DataError, match="no images found"):
        image_folder_source(tmp_path / "empty")
    with pytest.raises(DataError, match="no class subfolders"):
        image_folder_source(tmp_path / "empty" / "cls")


def test_bad_file_report_file_dedup_and_resume(tmp_path, caplog):
    report = BadFileReport(tmp_path / "run")
    assert report.add("/d/a.jpg", "OSError: broken\ndata")
    assert not report.add("/d/a.jpg", "again")
    report.add("/d/b.jpg", "missing")
    assert report.count == 2 and report.paths == ["/d/a.jpg", "/d/b.jpg"]
    lines = (tmp_path / "run" / "bad_files.txt").read_text().splitlines()
    assert lines == ["/d/a.jpg\tOSError: broken data", "/d/b.jpg\tmissing"]
    assert "unreadable image /d/a.jpg (" in caplog.text and "a stand-in takes its place" in caplog.text
    # a missing listed file: the source's one summary line said so (a line each flooded the console)
    assert "/d/b.jpg" not in caplog.text
    BadFileReport(outcome="left out of the evaluation").add("/d/c.jpg", "OSError: x")  # the kNN sets
    assert "unreadable image /d/c.jpg (OSError: x): left out of the evaluation" in caplog.text
    resumed = BadFileReport(tmp_path / "run")  # a restarted run does not write duplicates
    assert not resumed.add("/d/a.jpg", "x")
    assert len((tmp_path / "run" / "bad_files.txt").read_text().splitlines()) == 2
    assert BadFileReport(tmp_path, rank=1, world_size=2).report_path.name == "bad_files.rank1.txt"


def test_file_list_paths_with_spaces(tmp_path):
    """The last field is a label only when it is an integer; else the whole line is the path."""
    _touch_images(tmp_path, ["my photo.jpg", "a b/c  d.png", "x.jpg"])
    lst = tmp_path / "l.txt"
    lst.write_text("my photo.jpg\nmy photo.jpg 3\n a b/c  d.png \na b/c  d.png\t+2\nx.jpg 0\n")
    assert file_list_source(tmp_path, lst).samples == [
        (str(tmp_path / "my photo.jpg"), -1),
        (str(tmp_path / "my photo.jpg"), 3),
        (str(tmp_path / "a b/c  d.png"), -1),
        (str(tmp_path / "a b/c  d.png"), 2),
        (str(tmp_path / "x.jpg"), 0),
    ]


@pytest.mark.parametrize("label", ["1.5", "0x3", "\uff15"])
def test_file_list_non_integer_label_after_an_image_path(tmp_path, label):
    """``a.jpg <not an integer>`` is a bad label, not a path ``'a.jpg 1.5'`` (ASCII digits only)."""
    _touch_images(tmp_path, ["a.jpg"])
    lst = tmp_path / "l.txt"
    lst.write_text(f"a.jpg 1\na.jpg {label}\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"bad label {label!r}") as err:
        file_list_source(tmp_path, lst)
    assert ":2:" in _one_line(err)


def test_file_list_label_must_fit_int64(tmp_path):
    _touch_images(tmp_path, ["a.jpg"])
    lst = tmp_path / "l.txt"
    lst.write_text(f"a.jpg {2**63 - 1}\n")
    assert file_list_source(tmp_path, lst).samples == [(str(tmp_path / "a.jpg"), 2**63 - 1)]
    for big in (2**63, 99999999999999999999):
        lst.write_text(f"a.jpg 1\na.jpg {big}\n")
        with pytest.raises(DataError, match=r"labels must be < 2\*\*63") as err:
            file_list_source(tmp_path, lst)
        assert f"{lst}:2:" in _one_line(err)


def test_file_list_with_byte_order_mark(tmp_path):
    _touch_images(tmp_path, ["a.jpg", "b.jpg"])
    lst = tmp_path / "l.txt"
    lst.write_bytes(b"\xef\xbb\xbfa.jpg 1\r\nb.jpg 2\r\n")  # as Windows editors save it
    src = file_list_source(tmp_path, lst)
    assert src.samples == [(str(tmp_path / "a.jpg"), 1), (str(tmp_path / "b.jpg"), 2)]
    assert src.missing == []


def test_file_list_keeps_names_that_are_not_utf8(tmp_path):
    """A Latin-1 file name in a list (as Linux file systems allow) names the file, not an error."""
    _touch_images(tmp_path, ["a.jpg"])
    name = os.fsdecode(b"caf\xe9.jpg")  # a str with a surrogate, as os.listdir gives it
    (tmp_path / name).write_bytes((tmp_path / "a.jpg").read_bytes())
    lst = tmp_path / "l.txt"
    lst.write_bytes(b"a.jpg 0\ncaf\xe9.jpg 1\n")
    src = file_list_source(tmp_path, lst)
    assert src.samples == [(str(tmp_path / "a.jpg"), 0), (str(tmp_path / name), 1)] and src.missing == []


def test_scan_enters_each_folder_once(tmp_path):
    """Links back up the tree or to the folder itself are not followed again; links elsewhere are."""
    _touch_images(tmp_path / "tree", ["imgs/0.jpg", "imgs/1.jpg", "imgs/2.jpg"])
    os.symlink("..", tmp_path / "tree" / "imgs" / "up")
    src = open_source(tmp_path / "tree")
    assert src.kind == "imagefolder"
    assert [os.path.relpath(p, tmp_path / "tree") for p in src.paths] == ["imgs/0.jpg", "imgs/1.jpg", "imgs/2.jpg"]

    _touch_images(tmp_path / "flat", ["0.jpg"])
    _touch_images(tmp_path / "elsewhere", ["e.jpg"])
    os.symlink(".", tmp_path / "flat" / "self")
    os.symlink("../elsewhere", tmp_path / "flat" / "link1")
    os.symlink("../elsewhere", tmp_path / "flat" / "link2")  # the same folder again: once
    assert [os.path.relpath(p, tmp_path / "flat") for p in folder_scan_source(tmp_path / "flat").paths] == [
        "0.jpg",
        "link1/e.jpg",
    ]


def test_scan_two_self_links_do_not_hang(tmp_path):
    """Two links to ``.`` make 2**depth paths to walk without the loop check (a hang)."""
    _touch_images(tmp_path, ["0.jpg"])
    os.symlink(".", tmp_path / "self1")
    os.symlink(".", tmp_path / "self2")
    result: list = []
    worker = threading.Thread(target=lambda: result.append(folder_scan_source(tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the folder scan did not finish"
    assert result[0].paths == [str(tmp_path / "0.jpg")]


def test_scan_takes_regular_files_and_broken_links_not_fifos(tmp_path):
    """A FIFO named like an image hung every loader that opened it (both backends, an audit's repro);
    a broken link stays in, to be reported as unreadable. The walk's order is os.walk's: a folder's
    files (sorted) before its subfolders (sorted), depth first."""
    _touch_images(tmp_path / "flat", ["b.jpg", "a/1.jpg", "a/z/2.jpg", "a0.jpg", "c/3.jpg"])
    os.mkfifo(tmp_path / "flat" / "pipe.jpg")
    os.symlink("nowhere.jpg", tmp_path / "flat" / "broken.jpg")
    os.symlink("loop.jpg", tmp_path / "flat" / "loop.jpg")  # broken too (ELOOP)
    paths = [os.path.relpath(p, tmp_path / "flat") for p in folder_scan_source(tmp_path / "flat").paths]
    assert paths == ["a0.jpg", "b.jpg", "broken.jpg", "loop.jpg", "a/1.jpg", "a/z/2.jpg", "c/3.jpg"]
    _touch_images(tmp_path / "tree", ["c1/a.jpg", "c2/b.jpg"])
    os.mkfifo(tmp_path / "tree" / "c1" / "pipe.png")
    assert [os.path.basename(p) for p in open_source(tmp_path / "tree").paths] == ["a.jpg", "b.jpg"]


def test_bad_file_report_non_utf8_names(tmp_path):
    """A file name that is not UTF-8 (a str with surrogates from ``os``) is written as its bytes."""
    name = os.fsdecode(b"caf\xe9.jpg")
    report = BadFileReport(tmp_path)
    assert report.add(f"/d/{name}", f"OSError: cannot identify image file '/d/{name}'")
    assert (tmp_path / "bad_files.txt").read_bytes().startswith(b"/d/caf\xe9.jpg\t")
    resumed = BadFileReport(tmp_path)
    assert resumed.paths == [f"/d/{name}"] and not resumed.add(f"/d/{name}", "again")


def test_samples_digest_is_relative_to_the_root_and_follows_the_samples(tmp_path):
    """The fingerprint a checkpoint records: the same wherever the data is mounted, another for a
    renamed file; its per-source cache (every checkpoint records it) follows a change of samples."""
    from fastmae.data.sources import Source, samples_digest

    a = Source(root="/d", samples=[("/d/x/a.jpg", 0), ("/d/b.jpg", 1)], kind="imagefolder")
    b = Source(root="/mnt/e", samples=[("/mnt/e/x/a.jpg", 0), ("/mnt/e/b.jpg", 1)], kind="imagefolder")
    c = Source(root="/d", samples=[("/d/x/a2.jpg", 0), ("/d/b.jpg", 1)], kind="imagefolder")
    assert samples_digest(a) == samples_digest(b) != samples_digest(c)
    outside = Source(root="/d", samples=[("/elsewhere/a.jpg", 0)], kind="list")  # relpath's way
    assert samples_digest(outside) != samples_digest(Source(root="/d", samples=[("/d/a.jpg", 0)], kind="list"))
    a.samples.append(("/d/c.jpg", 2))  # the cache follows the samples
    assert samples_digest(a) != samples_digest(b)


def test_packed_samples_are_the_samples(tmp_path):
    """Paths (a name that is not UTF-8 kept as its bytes, as os gives it) and labels, by index as a list."""
    odd = os.fsdecode(b"/d/caf\xe9.jpg")  # Latin-1 bytes: a str with a surrogate
    samples = [("/d/a.jpg", 0), (odd, 7), ("/d/\u00fcber/b c.png", -1), ("/d/x.jpg", 3)]
    packed = PackedSamples(samples)
    assert len(packed) == 4 and [packed[j] for j in range(4)] == samples and packed[-1] == samples[-1]
    assert os.fsencode(packed[1][0]) == b"/d/caf\xe9.jpg"
    with pytest.raises(IndexError):
        packed[4]
    assert len(PackedSamples([])) == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup") or not hasattr(os, "fork"), reason="Linux only")
def test_packed_samples_are_read_without_copying_in_a_forked_worker():
    """What a forked DataLoader worker pays to read every sample: a list of tuples gets its pages
    copied as the reads write the items' reference counts (~10 MiB for these 50k; ~250 MiB per
    worker for ImageNet); the packed buffers are only read."""

    def private_dirty_kib() -> int:
        with open("/proc/self/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))

    samples = [(f"/data/train/n{j % 1000:08d}/n{j % 1000:08d}_{j}.JPEG", j % 1000) for j in range(50_000)]
    grown = {}
    for name, held in (("list", samples), ("packed", PackedSamples(samples))):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child reads every sample, as a worker does over an epoch
            before = private_dirty_kib()
            for j in range(len(held)):
                path, label = held[j]
            os.write(write, str(private_dirty_kib() - before).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        grown[name] = int(os.read(read, 64))
        os.close(read), os.close(write)
    assert grown["list"] > 5000 and grown["packed"] < 1000, grown


def test_the_workers_datasets_hold_packed_samples(tmp_path):
    """The training and evaluation loaders hand their DataLoader workers packed samples."""
    from PIL import Image

    from fastmae.data import TorchLoader
    from fastmae.data.eval import EvalLoader

    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    source = folder_scan_source(tmp_path)
    loaders = [TorchLoader(source, 2, 16, num_workers=0), EvalLoader(source, 2, 16, num_workers=0)]
    for loader in loaders:
        held = loader._loader.dataset.samples
        assert isinstance(held, PackedSamples) and [held[j] for j in range(len(held))] == source.samples
    loaders[0].close()


def test_a_read_error_is_described_without_its_path():
    """PIL's message repeats the path the log line and the report already give."""
    from fastmae.data.encoded import describe

    path = "/d/cat.jpg"
    assert describe(OSError(f"cannot identify image file {path!r}"), path) == "OSError: cannot identify image file"
    assert describe(FileNotFoundError(2, "No such file or directory"), path).endswith("No such file or directory")
    missing = FileNotFoundError(f"[Errno 2] No such file or directory: {path!r}")
    assert describe(missing, path) == "FileNotFoundError: [Errno 2] No such file or directory"
    assert describe(ValueError(""), path) == "ValueError"
    assert describe(OSError("truncated"), None) == "OSError: truncated"


def test_a_broken_data_set_logs_its_first_unreadable_files_and_reports_all(tmp_path, caplog):
    report = BadFileReport(tmp_path)
    for i in range(BadFileReport.LOG_EACH + 5):
        report.add(f"/d/{i}.jpg", "OSError: broken")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == BadFileReport.LOG_EACH + 1 and "/d/19.jpg" in lines[-2] and "/d/20.jpg" not in caplog.text
    assert (
        lines[-1] == f"further unreadable images are not logged one by one: {tmp_path / 'bad_files.txt'} lists them all"
    )
    assert report.count == 25 and len((tmp_path / "bad_files.txt").read_text().splitlines()) == 25
