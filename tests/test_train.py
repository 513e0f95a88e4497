"""The trainer on CPU: a tiny run learns and leaves its files, accumulation, run directories,
compile and precision settings, starting from another run's weights.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmae import messages
from fastmae import train as train_mod
from fastmae.config import ConfigError, make_config
from fastmae.log import read_metrics
from fastmae.rundir import hold_run_dir, release_run_dirs, resolve_run_dir
from fastmae.train import lr_at, main
from tests.training import REPO, losses, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lr_schedule_is_the_references():
    """Linear warm-up over fractional epochs, then half-cycle cosine down to min_lr."""
    cfg = make_config({"epochs": 10, "warmup_epochs": 2.0, "min_lr": 1e-6})
    peak = 1e-3
    assert lr_at(0.0, peak, cfg) == 0.0
    assert lr_at(1.0, peak, cfg) == pytest.approx(peak / 2)
    assert lr_at(2.0, peak, cfg) == pytest.approx(peak)
    assert lr_at(6.0, peak, cfg) == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(10.0, peak, cfg) == pytest.approx(1e-6)


def test_tiny_run_learns_and_leaves_its_files(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, "--epochs", "6", "--lr", "3e-3", "--vis-every-epochs", "3")) == 0
    out = capsys.readouterr().out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 49))  # 64 images // 8 = 8 steps x 6 epochs
    assert {"step", "epoch", "loss", "lr", "img_s", "time"} <= set(records[0])
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-8:]) / 8
    assert last < 0.85 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    ckpts = sorted(run.glob("ckpt-*.pt"))
    assert ckpts and ckpts[-1].name == "ckpt-step000000048.pt"
    assert sorted(p.name for p in run.glob("recon-*.png")) == ["recon-epoch0003.png", "recon-epoch0006.png"]
    assert '"lr": ' in (run / "config.json").read_text()
    for what in ("checkpoint", "metrics", "pictures", str(ckpts[-1])):
        assert what in out
    assert "data=torch (read in the main process); fresh run" in out
    # what ran, for tracing its numbers: versions, device, and the checkout's commit where there is one
    ran = json.loads((run / "config.json").read_text())["resolved"]["environment"]
    assert ran["torch"] == torch.__version__ and ran["device_name"]
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert ran["git"]["commit"] == head.strip()


def test_the_start_line_says_how_many_workers_read_and_why_fewer():
    """--num-workers is cut to the CPUs the process may use (more only contend): say so, once."""
    note = messages.data_workers_note
    assert note(8, {"data_backend": "torch", "data_workers": 2}) == (
        " (2 workers: --num-workers 8 is more than the 2 CPUs this process may use)"
    )
    assert note(2, {"data_backend": "torch", "data_workers": 2}) == " (2 workers)"
    assert note(4, {"data_backend": "dali", "data_workers": 4}) == " (4 threads)"
    assert note(8, {"data_backend": "synthetic", "data_workers": 0}) == ""


@pytest.mark.parametrize("n_images", [64, 60])
def test_gradient_accumulation_changes_nothing(tiny_data, tmp_path, n_images):
    """batch 8 x accum 1 and batch 4 x accum 2 see the same images and masks: the same losses, and the
    same schedule. With 60 images the two loaders hold 7 and 15 micro-batches an epoch for the same 7
    steps: the schedule counts optimizer steps, so the learning rates agree exactly."""
    data = tiny_data
    if n_images != 64:
        data = tmp_path / "data"
        shutil.copytree(tiny_data, data)
        for p in sorted(data.rglob("*.jpg"))[n_images:]:
            p.unlink()
    main(tiny_args(data, tmp_path / "a", "--epochs", "2"))
    main(tiny_args(data, tmp_path / "b", "--epochs", "2", "--batch-size", "4", "--accum-iter", "2"))
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    steps_per_epoch = n_images // 8
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 2 * steps_per_epoch + 1))
    for ra, rb in zip(a, b, strict=True):
        s = ra["step"]
        assert ra["lr"] == rb["lr"], f"step {s}"
        assert ra["epoch"] == rb["epoch"] == round(s / steps_per_epoch, 4), f"step {s}"
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6), f"step {s}"  # measured 1e-7: the sums' order
    # the config records what ran: --accum-iter set the accumulation, the demo's effective_batch (0) did not
    resolved = json.loads((tmp_path / "b" / "config.json").read_text())["resolved"]
    assert (resolved["accum_iter"], resolved["effective_batch"]) == (2, 8)


def test_default_run_dirs_never_overwrite_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir(make_config()) == (Path("runs/demo"), None)
    (tmp_path / "runs/demo/ckpt-step000000010.pt").write_bytes(b"")
    assert resolve_run_dir(make_config()) == (Path("runs/demo-2"), None)  # a second `python -m fastmae.train`
    run_dir, path = resolve_run_dir(make_config({"resume": "auto"}))
    assert run_dir == Path("runs/demo") and path.name == "ckpt-step000000010.pt"
    assert resolve_run_dir(make_config({"resume": str(path)})) == (Path("runs/demo"), path)
    release_run_dirs()


def test_a_run_dir_in_use_is_not_shared(tmp_path, monkeypatch):
    """Two runs started in one directory replaced each other's metrics and config and deleted the
    checkpoint the other was writing. A run holds its directory (flock): a default one is passed
    over, a named one refused, and a killed holder holds nothing (the kernel drops its lock)."""
    import fcntl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/demo").mkdir(parents=True)
    other = open(tmp_path / "runs/demo/.fastmae.lock", "a+")  # another open file: another holder
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.write("pid 4242 on elsewhere\n")
    other.flush()
    assert resolve_run_dir(make_config()) == (Path("runs/demo-2"), None)
    with pytest.raises(ConfigError, match=r"runs/demo is in use by another run \(pid 4242 on elsewhere\)"):
        resolve_run_dir(make_config({"run_dir": "runs/demo"}))
    other.close()
    assert resolve_run_dir(make_config({"run_dir": "runs/demo"})) == (Path("runs/demo"), None)
    release_run_dirs()


def test_the_demo_preset_end_to_end(tmp_path):
    """README's first command, scaled down (256 of its 2048 images, 4 of its 8 epochs): the demo set
    is generated as image files on first use, read by the real loader, the loss falls, and the run
    leaves a checkpoint, metrics and reconstruction PNGs at the paths it prints."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "FASTMAE_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "fastmae.train", "--demo-images", "256", "--epochs", "4", "--run-dir", str(run_dir),
            "--no-progress"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    images = [p for p in (tmp_path / "cache").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert len(images) == 256
    loss = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert loss[-1] < 0.75 * loss[0], loss  # measured 1.36 -> 0.79
    printed = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line.startswith("  ")}
    for what in ("checkpoint", "metrics", "config", "pictures"):
        assert Path(printed[what]).is_file(), (what, printed)
    assert Path(printed["checkpoint"]).parent == run_dir and Path(printed["pictures"]).suffix == ".png"


def test_a_killed_runs_forked_workers_do_not_hold_its_run_dir(tmp_path):
    """SIGKILL a run whose forked child (a DataLoader worker) lives on: the directory is free at once
    (the worker's inherited lock kept an immediate --resume auto out for ~5 s)."""
    script = f"""
import os, signal, sys, time
from pathlib import Path
from fastmae.rundir import hold_run_dir
assert hold_run_dir(Path({str(tmp_path / "run")!r})) is None
child = os.fork()
if child == 0:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1), os.dup2(null, 2)  # the test reads the parent's output to its end
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    try:
        os.kill(child, 0)  # the worker is still there
        assert hold_run_dir(tmp_path / "run") is None
    finally:
        os.kill(child, signal.SIGKILL)
        release_run_dirs()


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_compiled_bf16_run_and_resume(tiny_data, tmp_path, fused):
    """The GPU defaults (compile, bf16, fused AdamW, the Triton path or not): learns, resumes exactly."""
    flag = "--fused" if fused else "--no-fused"
    args = ["--epochs", "4", "--lr", "3e-3", "--device", "cuda", flag, "--ckpt-every-steps", "4"]
    assert main(tiny_args(tiny_data, tmp_path / "ref", *args)) == 0
    reference = losses(tmp_path / "ref")
    assert all(math.isfinite(loss) for _, loss in reference)
    assert sum(loss for _, loss in reference[-8:]) / 8 < 0.9 * reference[0][1]
    config = (tmp_path / "ref" / "config.json").read_text()
    assert '"compile": true' in config and '"precision": "bf16"' in config
    rows = [r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    assert all(0 < r["max_mem_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30 for r in rows)
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, *args, "--max-steps", "13")) == 0
    assert main(tiny_args(tiny_data, run, *args, "--resume", "auto")) == 0
    for (s, a), (_, b) in zip(losses(run), reference, strict=True):
        # atomics in CUDA backward passes are not bitwise deterministic: compare at bf16-run noise, not 0
        assert a == pytest.approx(b, rel=2e-2), f"step {s}"


def test_compiled_bf16_run_resumes_exactly_cpu(tiny_data, tmp_path):
    """The CPU twin of the CUDA test above: compiled, bf16 autocast, killed-and-resumed (here by
    --max-steps) gives the uninterrupted run's losses. On CPU the compiled kernels are deterministic,
    so exactly; the fused path is CUDA's (its kernels are interpreted on CPU, not compiled)."""
    args = ["--epochs", "2", "--lr", "3e-3", "--device", "cpu", "--compile", "--precision", "bf16",
            "--ckpt-every-steps", "4"]  # fmt: skip
    assert main(tiny_args(tiny_data, tmp_path / "ref", *args)) == 0
    reference = losses(tmp_path / "ref")
    config = (tmp_path / "ref" / "config.json").read_text()
    assert '"compile": true' in config and '"precision": "bf16"' in config
    run = tmp_path / "run"
    assert main(tiny_args(tiny_data, run, *args, "--max-steps", "5")) == 0
    assert main(tiny_args(tiny_data, run, *args, "--resume", "auto")) == 0
    assert losses(run) == reference and len(reference) == 16


@pytest.mark.gpu
def test_cuda_fp32_precision_turns_tf32_off(tiny_data, tmp_path):
    """``--precision fp32`` (the non-finite hint's fallback) means fp32 matmuls, not TF32."""
    args = ["--max-steps", "1", "--device", "cuda", "--no-compile", "--no-fused"]
    assert main(tiny_args(tiny_data, tmp_path / "a", *args, "--precision", "fp32")) == 0
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert main(tiny_args(tiny_data, tmp_path / "b", *args, "--precision", "bf16")) == 0
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_selective_checkpoint_notice_is_dropped_and_nothing_else(caplog):
    """Dynamo's in-place notice would print on every compiled CUDA run (selective is the default there)."""
    import logging

    log = logging.getLogger("torch._higher_order_ops.wrap")
    before = list(log.filters)
    try:
        messages.quiet_selective_checkpoint_notice()
        messages.quiet_selective_checkpoint_notice()  # idempotent
        assert len(log.filters) == len(before) + 1
        with caplog.at_level(logging.WARNING, logger="torch._higher_order_ops.wrap"):
            log.warning("\nDetected that context_fn is passed to torch.utils.checkpoint under torch.compile.\n")
            log.warning("something else")
        assert [r.getMessage() for r in caplog.records] == ["something else"]
    finally:
        log.filters[:] = before


def test_compile_mode_reaches_torch_compile(tiny_data, tmp_path, monkeypatch, capsys):
    """--compile-mode is torch.compile's mode (None for default); the start line says which."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or model)
    run = tmp_path / "run"
    args = ["--epochs", "1", "--max-steps", "1", "--compile", "--compile-mode", "max-autotune-no-cudagraphs"]
    assert main(tiny_args(tiny_data, run, *args)) == 0
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}]
    assert "compile=True (max-autotune-no-cudagraphs)" in capsys.readouterr().out
    assert main(tiny_args(tiny_data, tmp_path / "default", "--epochs", "1", "--max-steps", "1", "--compile")) == 0
    assert seen[1] == {"mode": None} and "compile=True, " in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bf16_residual_stream_needs_bf16_autocast(tiny_data, tmp_path, capsys, precision):
    """--residual-dtype autocast is a one-line error unless the run is bf16: in fp32 it would do
    nothing, in fp16 the stream could overflow. Nothing is written before it."""
    run = tmp_path / "run"
    argv = tiny_args(tiny_data, run, "--epochs", "1", "--residual-dtype", "autocast", "--precision", precision)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"needs --precision bf16 (this run: {precision};" in err[0]
    assert not run.exists()


def test_triton_attention_on_cpu_runs_interpreted(monkeypatch):
    """``--attn-backend triton`` on a CPU machine switches the Triton interpreter on, as ``--fused`` does."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = make_config({"attn_backend": "triton", "decoder_attn_backend": "sdpa", "fused": False})
    model = train_mod.build_model(cfg, torch.device("cpu"))
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert model.blocks[0].attn.backend == "triton" and model.decoder_blocks[0].attn.backend == "sdpa"


def test_init_from_starts_a_fresh_run_from_another_runs_weights(tiny_data, tmp_path, capsys):
    """Continued pretraining: a new run starts from an earlier run's weights (with lr 0 its first
    checkpoint holds them unchanged), with its own optimizer and schedule from step 1; once it has a
    checkpoint of its own, resuming reads that instead; an encoder of another shape is a one-line error."""
    main(tiny_args(tiny_data, tmp_path / "a", "--epochs", "1", "--max-steps", "3", "--lr", "3e-3"))
    source = tmp_path / "a" / "ckpt-step000000003.pt"
    capsys.readouterr()
    run = tmp_path / "b"
    args = tiny_args(tiny_data, run, "--epochs", "1", "--init-from", str(source), "--lr", "0")
    assert main([*args, "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"fresh run from {source} (" in out and "decoder loaded" in out
    a = torch.load(source, weights_only=True)["model"]
    b = torch.load(run / "ckpt-step000000001.pt", weights_only=True)
    assert b["step"] == 1 and a.keys() == b["model"].keys()
    assert all(torch.equal(a[k], b["model"][k]) for k in a)
    moved = source.rename(tmp_path / "moved.pt")  # a resumed run needs only its own checkpoints
    assert main([*args, "--max-steps", "2", "--resume", "auto"]) == 0
    assert "not read: resuming" in capsys.readouterr().out
    assert [s for s, _ in losses(run)] == [1, 2]
    moved.rename(source)

    assert main(tiny_args(tiny_data, tmp_path / "c", "--init-from", str(source), "--embed-dim", "64")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its encoder has embed_dim 32 where this run's has embed_dim 64" in err[0], err
    assert not (tmp_path / "c").exists()  # checked before the data is opened or anything is written
    assert main(tiny_args(tiny_data, tmp_path / "c", "--init-from", str(source), "--num-heads", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the heads are in the checkpoint's config
    assert len(err) == 1 and "its encoder has num_heads 2 where this run's has num_heads 4" in err[0], err
    with pytest.raises(SystemExit) as e:  # argparse's one-line usage error, before anything runs
        main(tiny_args(tiny_data, tmp_path / "d", "--init-from", str(tmp_path / "none.pt")))
    assert e.value.code == 2 and not (tmp_path / "d").exists()
    assert f"--init-from {tmp_path / 'none.pt'} does not exist" in capsys.readouterr().err.strip().splitlines()[-1]
    # with --resume auto the file is checked only where it is read: a run with no checkpoint yet
    assert main(tiny_args(tiny_data, tmp_path / "e", "--init-from", str(tmp_path / "none.pt"), "--resume", "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--init-from {tmp_path / 'none.pt'}: cannot read" in err[0], err


def test_a_floor_above_the_peak_lr_and_the_continue_hint(tiny_data, tmp_path, capsys):
    """A --min-lr above the peak would make the cosine climb: a one-line error. A run stopped by
    --max-steps continues with --resume auto alone; one whose schedule ran out needs more --epochs."""
    assert main(tiny_args(tiny_data, tmp_path / "a", "--lr", "1e-3", "--min-lr", "1e-2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "min_lr 0.01 is above the peak lr 0.001" in err[0], err
    assert main(tiny_args(tiny_data, tmp_path / "b", "--epochs", "1", "--max-steps", "2")) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"--run-dir {tmp_path / 'b'} --resume auto")
    assert main(tiny_args(tiny_data, tmp_path / "b", "--epochs", "1", "--resume", "auto")) == 0
    assert "--resume auto --epochs N" in capsys.readouterr().out.strip().splitlines()[-1]
    # a run directory with a space: the printed command pastes into a shell as it is
    spaced = tmp_path / "my run"
    assert main(tiny_args(tiny_data, spaced, "--epochs", "1", "--max-steps", "2")) == 0
    command = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("continue:").strip()
    assert shlex.split(command)[-4:] == ["--run-dir", str(spaced), "--resume", "auto"], command
