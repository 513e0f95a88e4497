"""``python -m fastmae.finetune --resume auto``: a run continues exactly, and what it cannot continue is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastmae import finetune as ft
from fastmae.log import read_metrics
from fastmae.rundir import release_run_dirs
from tests.finetuning import REPO, color_classes, run_finetune


def test_a_run_from_before_min_scale_resumes_at_its_scale(tmp_path):
    """A config.json written before --min-scale existed: its run cropped at pretraining's 0.2."""
    (tmp_path / "config.json").write_text(json.dumps({"mode": "full", "batch_size": 16}))
    assert ft.saved_config(tmp_path)["min_scale"] == 0.2
    (tmp_path / "config.json").write_text(json.dumps({"mode": "full", "min_scale": 0.08}))
    assert ft.saved_config(tmp_path)["min_scale"] == 0.08
    assert ft.saved_config(tmp_path / "none") == {}


def test_a_resumed_runs_lr_goes_back_to_blr(tmp_path, labelled):
    """A run started with --lr keeps it on resume unless --lr auto, or --blr alone, says otherwise."""
    data, _ = labelled
    saved = {"mode": "full", "train_path": str(data), "model": "vit_base_patch16", "lr": 1e-3}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    resume = ["--run-dir", str(tmp_path), "--resume", "auto"]
    assert ft.parse_args(resume).lr == 1e-3
    assert ft.parse_args([*resume, "--lr", "auto"]).lr is None
    assert (ft.parse_args([*resume, "--blr", "2e-3"]).lr, ft.parse_args([*resume, "--blr", "2e-3"]).blr) == (None, 2e-3)


def test_resuming_a_finished_run_leaves_its_results(tmp_path, labelled, capsys):
    """--resume auto on a run that finished said nothing of it, evaluated again and rewrote
    results.json (its minutes 0.12 -> 0.002). Now it says so and leaves them. Without a progress
    bar, each log step is a line, as pretraining's."""
    data, pre = labelled
    common = ("--lr", "1e-3", "--epochs", "1", "--warmup-epochs", "0")
    result, run_dir = run_finetune(tmp_path, data, pre, "full", *common)
    out = capsys.readouterr().out
    assert "step=2 epoch=" in out and "step=4 epoch=" in out  # --log-every 2, --no-progress
    before = (run_dir / "results.json").read_bytes()
    again = ft.finetune(ft.parse_args(["--run-dir", str(run_dir), "--resume", "auto"]))
    assert again == result and (run_dir / "results.json").read_bytes() == before
    assert f"finished at step {result['step']} of {result['step']}; its results stand" in capsys.readouterr().out


def test_resume_auto_continues_from_the_last_epoch(tmp_path, labelled):
    data, pre = labelled
    common = ["--lr", "1e-3", "--warmup-epochs", "1", "--drop-path", "0"]
    _, run_dir = run_finetune(tmp_path, data, pre, "full", *common, "--epochs", "1")
    first = read_metrics(run_dir / "metrics.jsonl")
    # tag the first run's records: a resumed run keeps them, a run that started over would rewrite them
    first = [{**r, "first_run": True} for r in first]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    run_finetune(tmp_path, data, pre, "full", *common, "--epochs", "2", "--resume", "auto")
    both = read_metrics(run_dir / "metrics.jsonl")
    assert both[: len(first)] == first  # the first epoch's records are kept, not redone
    assert not any("first_run" in r for r in both[len(first) :])
    assert both[-1]["step"] == 2 * first[-1]["step"] and both[-1]["epoch"] == 2.0
    assert len(list(run_dir.glob("ckpt-*.pt"))) == 1
    # The resumed run is the uninterrupted one: weights, optimizer state and RNG all restored. (The
    # first epoch is all warm-up, whose lr does not depend on --epochs.) Same ops, same order, on
    # CPU: every loss and metric is bit-identical, so compared exactly.
    result, _ = run_finetune(tmp_path / "uninterrupted", data, pre, "full", *common, "--epochs", "2")
    whole = read_metrics(tmp_path / "uninterrupted" / "run-full" / "metrics.jsonl")
    keys = ("step", "epoch", "loss", "lr", "val_top1", "val_top5")
    assert [[r.get(k) for k in keys] for r in both] == [[r.get(k) for k in keys] for r in whole]
    resumed = json.loads((run_dir / "results.json").read_text())
    assert {k: resumed[k] for k in ("step", "top1", "top5", "n_val", "best_top1")} == {
        k: result[k] for k in ("step", "top1", "top5", "n_val", "best_top1")
    }


def test_resume_refuses_another_effective_batch_or_data(tmp_path, labelled):
    """A step counts effective batches of the run's data: with another batch x processes, or another
    training set, the resumed step would fall in another epoch at another lr (it skipped 3 of 6
    epochs and doubled the lr on 2 processes): one line, naming what to change."""
    data, pre = labelled
    common = ["--lr", "1e-3", "--warmup-epochs", "0", "--drop-path", "0", "--epochs", "1"]
    _, run_dir = run_finetune(tmp_path, data, pre, "full", *common)
    config = (run_dir / "config.json").read_text()
    with pytest.raises(ft.ConfigError, match="--min-lr 0.5 is above the peak lr 0.001"):
        ft.finetune(ft.parse_args(["--run-dir", str(run_dir), "--resume", "auto", "--min-lr", "0.5"]))
    with pytest.raises(ft.ConfigError, match=r"effective batch of 16 .*this run has 8 \(8 x 1\)"):
        ft.finetune(ft.parse_args(["--run-dir", str(run_dir), "--resume", "auto", "--batch-size", "8",
                                   "--epochs", "2"]))  # fmt: skip
    more = color_classes(tmp_path / "more", per_class=48)  # the same classes, twice the images
    with pytest.raises(ft.ConfigError, match="its epochs were 4 steps, this run's training data gives 9"):
        ft.finetune(ft.parse_args(["--run-dir", str(run_dir), "--resume", "auto", "--train-path", str(more),
                                   "--epochs", "2"]))  # fmt: skip
    # the refusals left the run as it was (its config.json too, which the next resume reads): it goes on
    assert (run_dir / "config.json").read_text() == config
    ft.finetune(ft.parse_args(["--run-dir", str(run_dir), "--resume", "auto", "--epochs", "2"]))
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == 8
    # an fp32 (or bf16) run goes on in fp16 with a fresh loss scaler (its own was disabled: empty)
    ft.finetune(ft.parse_args(["--run-dir", str(run_dir), "--resume", "auto", "--epochs", "3", "--precision", "fp16"]))
    assert read_metrics(run_dir / "metrics.jsonl")[-1]["step"] == 12


@pytest.mark.parametrize("drop_path", ["0", "0.2"])
def test_sigterm_saves_and_the_resumed_run_is_the_uninterrupted_one(tmp_path, labelled, capsys, monkeypatch, drop_path):
    """A scheduler's SIGTERM mid-epoch: the run stops at the next log step after a checkpoint, with
    one line and exit 143; --resume auto then gives the uninterrupted run's records, bit for bit.
    Drop path draws from torch's global RNG, which the checkpoint restores: nothing else may draw
    from it between the two (a DataLoader's iterator drew its base seed there, one draw more in the
    resumed run, and the drop-path masks moved). The recipe's mixup, CutMix and erasing (on here) draw from
    numpy's, Python's and torch's generators: restored too."""
    import os
    import signal

    data, pre = labelled
    argv = ["--mode", "full", "--pretrained", str(pre), "--train-path", str(data), "--batch-size", "16",
            "--num-workers", "0", "--no-progress", "--log-every", "1", "--lr", "1e-3", "--warmup-epochs", "1",
            "--drop-path", drop_path, "--epochs", "2"]  # fmt: skip
    assert ft.main([*argv, "--run-dir", str(tmp_path / "whole")]) == 0
    calls = []
    lr_at = ft.lr_at

    def lr_at_then_sigterm(*a, **kw):  # the signal arrives during the 2nd step of 4 in the first epoch
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(*a, **kw)

    monkeypatch.setattr(ft, "lr_at", lr_at_then_sigterm)
    run = tmp_path / "stopped"
    assert ft.main([*argv, "--run-dir", str(run)]) == ft.EXIT_STOPPED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped by a signal at step 2; checkpoint" in err[0], err
    assert err[0].endswith(f"continue with python -m fastmae.finetune --run-dir {run} --resume auto")
    assert [p.name for p in run.glob("ckpt-*.pt")] == ["ckpt-step000000002.pt"]
    assert not (run / "results.json").exists()
    monkeypatch.setattr(ft, "lr_at", lr_at)
    assert ft.main(["--run-dir", str(run), "--resume", "auto"]) == 0  # the command it said: config.json gives the rest
    keys = ("step", "epoch", "loss", "lr", "val_top1", "val_top5")
    resumed, whole = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in whole]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is given back


def test_resume_refuses_another_runs_checkpoint(tmp_path, small, capsys):
    """``--resume auto`` with another number of classes, architecture or mode than the saved run's:
    one line naming both (not a size-mismatch or missing-keys traceback), and the run is left as it
    was; a kNN run's results are not overwritten by another mode's; --resume takes no path."""
    _, data, paths = small
    base = ["--pretrained", str(paths["run"]), "--train-path", str(data), "--num-workers", "0", "--no-progress",
            "--batch-size", "16", "--lr", "1e-2", "--warmup-epochs", "0", "--epochs", "1", "--max-steps", "1"]  # fmt: skip
    run = tmp_path / "run"
    assert ft.main([*base, "--mode", "full", "--run-dir", str(run)]) == 0
    saved = {p.name: p.read_bytes() for p in run.iterdir()}
    (ckpt_path,) = run.glob("ckpt-*.pt")
    for extra, message in (
        (["--mode", "full", "--num-classes", "5"], "it was saved with 4 classes, this run has 5 classes"),
        (["--mode", "full", "--img-size", "40"], "it was saved with img_size 32, this run has img_size 40"),
        (["--mode", "linear"], f"{run} holds a --mode full run: --resume auto continues it only with --mode full"),
    ):
        assert ft.main([*base, *extra, "--run-dir", str(run), "--resume", "auto"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == saved
    for name in ("config.json", "results.json"):  # the checkpoint says its mode too
        (run / name).unlink()
    assert ft.main([*base, "--mode", "linear", "--run-dir", str(run), "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"cannot resume {ckpt_path}: it was saved with --mode full, this run has --mode linear" in err[0]
    )

    knn = tmp_path / "knn"
    assert ft.main([*base, "--mode", "knn", "--run-dir", str(knn)]) == 0
    before = (knn / "results.json").read_text()
    assert ft.main([*base, "--mode", "linear", "--run-dir", str(knn)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run: pass another --run-dir" in err and "--resume auto" not in err  # no hint to refuse
    assert ft.main([*base, "--mode", "linear", "--run-dir", str(knn), "--resume", "auto"]) == 2
    assert f"{knn} holds a --mode knn run" in capsys.readouterr().err
    assert (knn / "results.json").read_text() == before

    with pytest.raises(SystemExit) as e:
        ft.parse_args([*base, "--mode", "full", "--run-dir", str(run), "--resume", str(ckpt_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"--resume takes '' or 'auto', got '{ckpt_path}'" in err[-1], err
    assert f"--run-dir {run} --resume auto" in err[-1]


def test_a_run_dir_in_use_is_not_shared(tmp_path, labelled, capsys):
    """Rank 0 holds its run directory, as pretraining does: a second fine-tune there is one line."""
    import fcntl

    data, pre = labelled
    run_dir = tmp_path / "run-knn"
    run_dir.mkdir()
    other = open(run_dir / ".fastmae.lock", "a+")  # another open file: another holder
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    other.write("pid 4242 on elsewhere\n")
    other.flush()
    argv = ["--mode", "knn", "--pretrained", str(pre), "--train-path", str(data), "--run-dir", str(run_dir),
            "--batch-size", "16", "--num-workers", "0", "--no-progress"]  # fmt: skip
    assert ft.main(argv) == 2
    assert f"{run_dir} is in use by another run (pid 4242 on elsewhere)" in capsys.readouterr().err
    assert not (run_dir / "results.json").exists()
    other.close()
    assert ft.main(argv) == 0 and (run_dir / "results.json").is_file()


def test_a_resumed_two_process_run_mixes_as_the_uninterrupted_one(tmp_path, labelled):
    """torchrun, 2 processes, the recipe's mixup / CutMix / erasing on: stopped at step 6 of 8 and
    resumed, the losses are the uninterrupted run's. The checkpoint holds rank 0's RNG states only;
    the mixes drew from numpy's and Python's global generators, so after a resume rank 1 mixed as
    rank 0 (an audit's repro: rank 1's lam 0.215 became rank 0's 0.620)."""
    data, pre = labelled
    common = ["--mode", "full", "--pretrained", str(pre), "--train-path", str(data), "--num-workers", "0",
              "--no-progress", "--log-every", "1", "--lr", "1e-3", "--epochs", "2", "--warmup-epochs", "0",
              "--batch-size", "8", "--aa", ""]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastmae.finetune"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for argv in (
        [*common, "--run-dir", str(tmp_path / "whole")],
        [*common, "--run-dir", str(tmp_path / "stopped"), "--max-steps", "6"],
        ["--run-dir", str(tmp_path / "stopped"), "--resume", "auto", "--no-progress"],
    ):
        proc = subprocess.run([*cmd, *argv], env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
    whole = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    resumed = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl")]
    assert [s for s, _ in whole] == list(range(1, 9)) and resumed == whole


def test_a_run_resumed_on_more_processes_keeps_its_effective_batch(tmp_path, labelled):
    """A 1-process run (batch 16) resumed under torchrun on 2: each process takes 8, the run's
    effective batch, and the run finishes (it was refused, naming the product to keep); the next
    resume's config has the 8."""
    data, pre = labelled
    common = ("--lr", "1e-3", "--warmup-epochs", "0", "--drop-path", "0", "--epochs", "2", "--aa", "")
    _, run_dir = run_finetune(tmp_path, data, pre, "full", *common, "--max-steps", "3")
    release_run_dirs()  # this process held it (ft.main lets go at its end; ft.finetune does not)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastmae.finetune", "--run-dir", str(run_dir), "--resume", "auto", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed on 2 process(es): --batch-size 8 keeps the run's effective batch 16" in proc.stdout
    assert json.loads((run_dir / "config.json").read_text())["batch_size"] == 8
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps[-1] == 8 and steps == sorted(set(steps)), steps  # 2 epochs of 4 steps, on to the end
