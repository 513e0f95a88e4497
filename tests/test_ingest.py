"""benchmarks/ingest.py: a device run's files into results/ under dated names, with the report."""

from __future__ import annotations

import json

import pytest

from benchmarks.ingest import gpu_tag, ingest, prefix_of


def test_ingest_names_copies_and_reports(tmp_path):
    src, dest = tmp_path / "files_at", tmp_path / "results"
    src.mkdir()
    env = {"date_utc": "2026-11-28T01:02:03+00:00", "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}}
    (src / "env.json").write_text(json.dumps(env))
    (src / "data.json").write_text(json.dumps({"benchmark": "data", "results": []}))
    (src / "run.log").write_text("=== stages\n")
    (src / "partial.json.tmp").write_text("{")  # a stage killed mid-write leaves these: skipped
    out = ingest(src, dest)
    names = sorted(p.name for p in out)
    assert names == [
        "2026-11-28_h100_data.json",
        "2026-11-28_h100_env.json",
        "2026-11-28_h100_report.md",
        "2026-11-28_h100_run.log",
    ]
    assert (dest / "2026-11-28_h100_run.log").read_text() == "=== stages\n"
    assert "data.json" in (dest / "2026-11-28_h100_report.md").read_text()
    with pytest.raises(SystemExit, match=r"exist\(s\)"):
        ingest(src, dest)  # never overwrites a committed result unless told to
    ingest(src, dest, force=True)


def test_gpu_tags():
    assert gpu_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_tag("NVIDIA H200") == "h200"
    assert gpu_tag("NVIDIA H100 PCIe") == "h100-pcie" and gpu_tag("NVIDIA H100 NVL") == "h100-nvl"
    assert gpu_tag("NVIDIA H200 NVL") == "h200-nvl"
    assert gpu_tag("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_tag(None) == "gpu"


def test_prefix_from_a_benchmark_json_when_there_is_no_env_json(tmp_path):
    """A call that ran one benchmark directly has no env.json: the benchmark's own env names the run."""
    src = tmp_path / "files_at"
    src.mkdir()
    env = {"date_utc": "2026-11-27T07:15:27+00:00", "device": {"type": "cuda", "name": "NVIDIA H200"}}
    (src / "step_vit_large.json").write_text(json.dumps({"benchmark": "step", "env": env}))
    (src / "notes.json").write_text(json.dumps([1, 2]))  # not a dict: passed over
    assert prefix_of(src) == "2026-11-27_h200_"


def test_a_profiles_env_names_a_run_without_benchmark_json(tmp_path):
    """A "kernels" call whose sweep wrote nothing still has ``kernels_env.json``: it names the GPU."""
    src = tmp_path / "files_at"
    src.mkdir()
    env = {"date_utc": "2026-11-29T00:00:00+00:00", "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}}
    (src / "kernels_env.json").write_text(json.dumps(env))
    (src / "run_kernels.log").write_text("=== stages\n")
    assert prefix_of(src) == "2026-11-29_h100_"


def test_a_clash_copies_nothing(tmp_path):
    """A name already in results/ stops the ingest before any file is copied."""
    src, dest = tmp_path / "files_at", tmp_path / "results"
    src.mkdir()
    dest.mkdir()
    env = {"date_utc": "2026-11-29T00:00:00+00:00", "device": {"type": "cuda", "name": "NVIDIA H200"}}
    (src / "env.json").write_text(json.dumps(env))
    (src / "data_dali.json").write_text("{}")
    (src / "run.log").write_text("new")
    (dest / "2026-11-29_h200_run.log").write_text("old")
    with pytest.raises(SystemExit, match="2026-11-29_h200_run.log exist"):
        ingest(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["2026-11-29_h200_run.log"]


def test_a_second_call_joins_the_first_calls_report(tmp_path):
    dest = tmp_path / "results"
    env = {"date_utc": "2026-11-27T07:00:00+00:00", "device": {"type": "cuda", "name": "NVIDIA H200"}}
    for call, name in (("one", "data.json"), ("two", "kernels.json")):
        src = tmp_path / call
        src.mkdir()
        (src / name).write_text(json.dumps({"benchmark": name.split(".")[0], "env": env, "results": []}))
        ingest(src, dest)
    md = (dest / "2026-11-27_h200_report.md").read_text()
    assert "2026-11-27_h200_data.json" in md and "2026-11-27_h200_kernels.json" in md


def test_datasheet_peaks_tell_the_form_factors_apart():
    from benchmarks.common import H100_SXM_BF16_TFLOPS, datasheet_bf16_tflops

    assert datasheet_bf16_tflops("NVIDIA H100 80GB HBM3") == H100_SXM_BF16_TFLOPS == 989.4
    assert datasheet_bf16_tflops("NVIDIA H100 PCIe") == 756.0 and datasheet_bf16_tflops("NVIDIA H100 NVL") == 835.0
    assert datasheet_bf16_tflops("NVIDIA H200") == 989.4 and datasheet_bf16_tflops("NVIDIA H200 NVL") == 835.0
    assert datasheet_bf16_tflops("Some GPU") is None


def test_a_tag_keeps_a_second_run_of_the_day_apart(tmp_path):
    """A second run of the same day and GPU (another commit) ingests beside the first with --tag:
    the first's files and report stay as they were, the second gets its own report."""
    dest = tmp_path / "results"
    env = {"date_utc": "2026-11-27T20:44:00+00:00", "device": {"type": "cuda", "name": "NVIDIA H200"}}
    for call, tag in (("first", None), ("second", "5ac384b")):
        src = tmp_path / call
        src.mkdir()
        (src / "env.json").write_text(json.dumps(env))
        (src / "data.json").write_text(json.dumps({"benchmark": "data", "env": env, "results": [], "call": call}))
        ingest(src, dest, tag=tag)
    assert json.loads((dest / "2026-11-27_h200_data.json").read_text())["call"] == "first"
    assert json.loads((dest / "2026-11-27-5ac384b_h200_data.json").read_text())["call"] == "second"
    assert "5ac384b" not in (dest / "2026-11-27_h200_report.md").read_text()
    assert "2026-11-27-5ac384b_h200_data.json" in (dest / "2026-11-27-5ac384b_h200_report.md").read_text()
    with pytest.raises(SystemExit, match="--tag"):
        ingest(tmp_path / "second", dest, tag="../x")


def test_the_senders_commit_wins_over_the_device_copys_git(monkeypatch):
    """The device copy's .git can be older than the tree sent (the H200's said 5ac384b + 8 changed
    files of a tree that was e01e201): FASTMAE_COMMIT names the tree, git's view is kept beside it."""
    from benchmarks import common

    if common._run(["git", "rev-parse", "HEAD"]) is None:
        pytest.skip("not a git checkout")
    monkeypatch.setenv("FASTMAE_COMMIT", "e01e2014ffeb")
    monkeypatch.setenv("FASTMAE_DIRTY", "0")
    info = common.git_info()
    assert (info["commit"], info["dirty"], info["source"]) == ("e01e2014ffeb", False, "FASTMAE_COMMIT")
    assert info["git_seen"]["source"] == "git" and len(info["git_seen"]["commit"]) == 40  # this checkout's
    monkeypatch.delenv("FASTMAE_COMMIT")
    assert common.git_info()["commit"] == info["git_seen"]["commit"]


def test_a_kernel_benchmark_alone_is_named_by_its_own_env(tmp_path):
    """bench_kernels keeps a flat env (device: the GPU's name): a folder holding only its JSON was
    named with today's date and 'gpu'; the report takes its driver from nvidia-smi's text."""
    env = {
        "device": "NVIDIA H200",
        "cuda": "13.0",
        "date_utc": "2026-11-27T20:43:49+00:00",
        "git_commit": "5ac384b",
        "git_dirty": False,
        "torch": "2.11.0+cu130",
        "triton": "3.6.0",
        "nvidia_smi": "| NVIDIA-SMI 580.159.04     Driver Version: 580.159.04     CUDA Version: 13.0 |",
    }
    (tmp_path / "kernels.json").write_text(json.dumps({"benchmark": "bench_kernels", "env": env}))
    assert prefix_of(tmp_path) == "2026-11-27_h200_"
    from benchmarks import report

    line = report._provenance({"env": env})
    assert "NVIDIA H200, driver 580.159.04, CUDA 13.0" in line and "transformers" not in line
    assert prefix_of(tmp_path, "x") == "2026-11-27-x_h200_"
    (tmp_path / "kernels.json").write_text(json.dumps({"env": {**env, "device": "x86_64", "cuda": None}}))
    assert prefix_of(tmp_path).endswith("_cpu_")
