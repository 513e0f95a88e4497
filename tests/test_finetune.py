"""``python -m fastmae.finetune``: each mode trains on a tiny labelled set and the loss falls."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae import finetune as ft
from fastmae.knn import KnnMonitor
from fastmae.log import read_metrics
from fastmae.model import MaskedAutoencoderViT
from tests.finetuning import REPO, SMALL, run_finetune

NO_MIX = ("--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", "")


@pytest.mark.parametrize(
    "mode,extra",
    [
        # the recipe less its regularisers (mixup's soft targets keep the loss high: a test of its own)
        ("full", ["--blr", "2e-2", "--epochs", "4", "--warmup-epochs", "1", "--drop-path", "0", *NO_MIX]),
        ("partial", ["--blr", "4e-2", "--epochs", "4", "--warmup-epochs", "1", "--trainable-blocks", "1", *NO_MIX]),
        ("linear", ["--optimizer", "adamw", "--lr", "3e-2", "--epochs", "4", "--warmup-epochs", "1"]),
    ],
)
def test_each_mode_trains_and_the_loss_falls(tmp_path, labelled, mode, extra):
    data, pre = labelled
    result, run_dir = run_finetune(tmp_path, data, pre, mode, *extra)
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    assert 0.0 <= result["top1"] <= 100.0 and result["top5"] == 100.0  # 4 classes: top-5 is everything
    config = json.loads((run_dir / "config.json").read_text())
    assert config["architecture"]["embed_dim"] == 48
    assert config["environment"]["torch"] == torch.__version__  # what ran, as pretraining's config.json says


def test_lars_too_small_to_move_the_head_is_told_and_its_advice_works(tmp_path, labelled, capsys):
    """The recipe's LARS at a small batch (lr 0.1 x 16 / 256) barely moves the head: the linear probe
    learned nothing in a user's run of the README's command (loss flat at ln 4 for 90 epochs). The
    run says so at its start, and what it suggests trains."""
    data, pre = labelled
    common = ("--epochs", "3", "--warmup-epochs", "1")
    flat_result, run_dir = run_finetune(tmp_path / "a", data, pre, "linear", *common)
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if line.startswith("warning: LARS at lr 0.00625"))
    flat = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert max(flat) - min(flat) < 0.02 * flat[0], flat  # the head stayed where it started
    advice = warning.split("use e.g. ")[1].split()
    result, run_dir = run_finetune(tmp_path / "b", data, pre, "linear", *common, *advice)
    assert "warning: LARS" not in capsys.readouterr().out
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert losses[-1] < 0.92 * losses[0], losses  # measured 0.90
    assert result["top1"] >= 75 > flat_result["top1"]  # measured 100 against 30 (4 classes)


def test_knn_mode_evaluates_without_training(tmp_path, labelled):
    data, pre = labelled
    result, run_dir = run_finetune(tmp_path, data, pre, "knn")
    assert result["mode"] == "knn" and result["k"] == 20 and 0.0 <= result["top1"] <= 100.0
    assert result["n_val"] == 20  # as the other modes' results say (4 classes x 5 held out)
    assert not list(run_dir.glob("ckpt-*"))


def test_lars_step_by_hand():
    """One LARS step: matrices get the trust ratio eta * ||p|| / ||g + wd p||, vectors plain momentum SGD."""
    from fastmae.lars import LARS

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=2.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.1)
    w.grad, b.grad = torch.tensor([[1.0, -2.0]]), torch.tensor([0.25])
    opt.step()
    dp = torch.tensor([[1.0, -2.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # (2.5, 0): norm 2.5
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 2.0 * (0.1 * 5 / 2.5) * dp)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 2.0 * 0.25]))
    w.grad, b.grad = torch.zeros(1, 2), torch.tensor([0.0])
    before = b.detach().clone()
    opt.step()  # momentum carries the last update
    torch.testing.assert_close(b.detach(), before - 2.0 * 0.9 * 0.25)


def test_recipe_defaults_by_mode_and_size():
    base = ft.recipe(ft.FinetuneConfig(mode="full", train_path="x"), depth=12)
    assert (base.layer_decay, base.drop_path, base.smoothing, base.blr, base.global_pool) == (
        0.65,
        0.1,
        0.1,
        5e-4,
        True,
    )
    large = ft.recipe(ft.FinetuneConfig(mode="full", train_path="x"), depth=24)
    assert (large.layer_decay, large.drop_path, large.blr) == (0.75, 0.2, 1e-3)
    probe = ft.recipe(ft.FinetuneConfig(mode="linear", train_path="x"), depth=12)
    assert (probe.weight_decay, probe.blr, probe.global_pool, probe.epochs) == (0.0, 0.1, False, 90)
    mine = ft.recipe(ft.FinetuneConfig(mode="full", train_path="x", layer_decay=0.5), depth=12)
    assert mine.layer_decay == 0.5
    # FINETUNE.md's epochs: B fine-tunes 100 and probes 90; L/H fine-tune 50 and probe 50 ("sufficient")
    epochs = {(m, d): ft.recipe(ft.FinetuneConfig(mode=m, train_path="x"), depth=d).epochs
              for m in ("full", "partial", "linear") for d in (12, 24, 32)}  # fmt: skip
    assert epochs == {("full", 12): 100, ("full", 24): 50, ("full", 32): 50, ("partial", 12): 100,
                      ("partial", 24): 100, ("partial", 32): 100, ("linear", 12): 90, ("linear", 24): 50,
                      ("linear", 32): 50}  # fmt: skip
    # the official fine-tuning and probe crop with torchvision's default scale, not pretraining's 0.2
    assert base.min_scale == probe.min_scale == 0.08


def test_training_crops_use_min_scale(tmp_path, labelled, monkeypatch):
    """The training loader gets RandomResizedCrop's scale (--min-scale, 1.0), on either backend."""
    from fastmae.data import build_loader, dali_available, open_source

    data, pre = labelled
    seen = []

    def recording(*args, **kwargs):
        loader = build_loader(*args, **kwargs)
        seen.append(loader.scale)
        return loader

    monkeypatch.setattr(ft, "build_loader", recording)
    for extra in ([], ["--min-scale", "0.35"]):
        run_finetune(tmp_path / str(len(seen)), data, pre, "linear", "--epochs", "1", "--warmup-epochs", "0", "--max-steps",
             "1", *extra)  # fmt: skip
    assert seen == [(0.08, 1.0), (0.35, 1.0)]
    backends = ["torch", "dali"] if dali_available() else ["torch"]
    for backend in backends:
        loader = build_loader(backend, open_source(str(data)), batch_size=4, image_size=32, scale=(0.5, 1.0))
        assert loader.scale == (0.5, 1.0), backend
        loader.close()


def test_fp16_scales_the_loss_so_the_encoder_trains(tmp_path, labelled, monkeypatch):
    """--precision fp16: the grads reaching the encoder through the head's 2e-5 init are ~1e-7,
    at or under fp16's smallest numbers, unless the loss is scaled (the official NativeScaler). The
    first step's grad of block 0's qkv, as the optimizer gets it, against fp32's: 0.57 relative
    error unscaled here (all of it zero with a wider model), 0.001 scaled."""
    data, pre = labelled
    build_optimizer, first_grad = ft.build_optimizer, {}

    def recording(cfg, model, lr, device):
        optimizer = build_optimizer(cfg, model, lr, device)
        qkv = model.blocks[0].attn.qkv.weight

        def hook(*_):
            first_grad.setdefault(cfg.precision, qkv.grad.clone())

        optimizer.register_step_pre_hook(hook)
        return optimizer

    monkeypatch.setattr(ft, "build_optimizer", recording)
    for precision in ("fp32", "fp16"):
        _, run_dir = run_finetune(tmp_path / precision, data, pre, "full", "--precision", precision, "--lr", "1e-3",
                          "--warmup-epochs", "0", "--epochs", "1", "--max-steps", "1", "--drop-path", "0")  # fmt: skip
        (path,) = run_dir.glob("ckpt-*.pt")
        scaler = torch.load(path, weights_only=True)["scaler"]
        assert ("scale" in scaler) == (precision == "fp16")  # saved, for an exact resume
    a, b = first_grad["fp32"], first_grad["fp16"]
    assert ((b - a).norm() / a.norm()).item() < 0.05


def test_architecture_from_weights_alone():
    mae = MaskedAutoencoderViT(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=1)
    arch = ft.architecture(ft.FinetuneConfig(train_path="x"), {"model": mae.state_dict()})
    assert arch == dict(patch_size=16, embed_dim=64, depth=3, num_heads=1, img_size=64)


def test_a_hugging_face_folder_says_its_heads(tmp_path):
    """The weights of a 64-wide model do not say 4 heads (the guess by width is 1); its folder's
    config.json does."""
    pytest.importorskip("transformers")
    from fastmae.convert import load_checkpoint, to_hf

    mae = MaskedAutoencoderViT(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4)
    to_hf(mae).save_pretrained(tmp_path / "hf")
    cfg = ft.FinetuneConfig(train_path="x", pretrained=str(tmp_path / "hf"))
    arch = ft.architecture(cfg, load_checkpoint(tmp_path / "hf"))
    assert arch == dict(patch_size=16, embed_dim=64, depth=3, num_heads=4, img_size=64)


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ft.parse_args(["--mode", "linear"])
    assert e.value.code == 2 and "--train-path is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ft.parse_args(["--train-path", str(tmp_path), "--pretrained", str(tmp_path / "nope.pt")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ft.parse_args(["--train-path", str(tmp_path), "--pretrained", str(tmp_path)])
    assert (
        f"--pretrained {tmp_path} is a folder without model.safetensors or pytorch_model.bin" in capsys.readouterr().err
    )


def test_unlabelled_source_is_refused(tmp_path):
    for i in range(6):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / f"{i}.jpg")
    cfg = ft.FinetuneConfig(train_path=str(tmp_path), model="vit_base_patch16")
    with pytest.raises(ft.DataError, match="unlabelled"):
        ft.open_splits(cfg)


def test_random_init_baseline_keeps_the_architecture(labelled):
    _, pre = labelled
    checkpoint = torch.load(pre, weights_only=True)
    w = checkpoint["model"]["blocks.1.attn.qkv.weight"]
    for init in ("pretrained", "random"):
        cfg = ft.recipe(ft.FinetuneConfig(mode="knn", init=init, pretrained=str(pre), train_path="x"), depth=2)
        arch = ft.architecture(cfg, checkpoint)
        vit = ft.build_classifier(cfg, arch, 4, checkpoint if init == "pretrained" else None)
        assert arch["depth"] == 2 and vit.blocks[1].attn.qkv.weight.shape == w.shape
        assert torch.equal(vit.blocks[1].attn.qkv.weight, w) == (init == "pretrained")


def test_two_processes_match_one(tmp_path, labelled):
    """torchrun, 2 gloo processes x 8 vs 1 process x 16: the same training losses and the same
    validation accuracy (each val image is scored once, on one rank, and the counts are summed)."""
    data, pre = labelled
    common = ["--mode", "full", "--pretrained", str(pre), "--train-path", str(data), "--num-workers", "0",
              "--no-progress", "--log-every", "1", "--lr", "1e-3", "--epochs", "1", "--warmup-epochs", "0",
              "--drop-path", "0", "--smoothing", "0", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--aa", ""]  # fmt: skip
    # (mixup mixes within a process's batch: 2 x 8 and 1 x 16 mix other pairs, as the official code)
    one = ft.finetune(ft.parse_args([*common, "--run-dir", str(tmp_path / "one"), "--batch-size", "16"]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["fastmae.finetune", *common, "--run-dir", str(tmp_path / "two"), "--batch-size", "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["n_val"] == one["n_val"] == 20  # every val image scored once (4 classes x 5)
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]
    a = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(a) == len(b) > 1 and b == pytest.approx(a, rel=1e-6)  # measured 1.8e-7


def test_a_settings_error_under_torchrun_is_said_once(tmp_path, labelled):
    """A setting refused after the process group formed (a warm-up longer than the run) is every
    rank's: rank 0 says it once (each rank printed the same line, as a user's walk-through saw)."""
    data, pre = labelled
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "fastmae.finetune", "--pretrained", str(pre), "--train-path", str(data), "--num-workers", "0",
           "--epochs", "2", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{ft.PROG}: error:")]
    assert len(errors) == 1 and "--warmup-epochs 5 is longer than --epochs 2" in errors[0], proc.stderr[-2000:]


def test_knn_on_two_processes_scores_the_whole_set(tmp_path, labelled):
    """torchrun --mode knn: every rank's share of the training and validation features joins the
    vote and the score (it scored rank 0's share alone: 38.9% on 2 processes where 1 gave 25.0%)."""
    data, pre = labelled
    common = ["--mode", "knn", "--pretrained", str(pre), "--train-path", str(data), "--num-workers", "0",
              "--no-progress", "--knn-k", "5", "--batch-size", "8"]  # fmt: skip
    one = ft.finetune(ft.parse_args([*common, "--run-dir", str(tmp_path / "one")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    cmd += ["fastmae.finetune", *common, "--run-dir", str(tmp_path / "two")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (two["top1"], two["top5"]) == (one["top1"], one["top5"]) and "note" not in two


@pytest.mark.parametrize("layout", ["easycv", "ddp"])
def test_prefixed_checkpoints_give_the_architecture_and_weights(small, layout):
    """EasyCV (``encoder.``) and DDP (``module.``) keys: the shapes are read and the weights load."""
    mae, _, paths = small
    checkpoint = torch.load(paths[layout], weights_only=True)
    cfg = ft.recipe(ft.FinetuneConfig(pretrained=str(paths[layout]), train_path="x", num_heads=2), depth=1)
    arch = ft.architecture(cfg, checkpoint)
    assert arch == dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=32)
    vit = ft.build_classifier(cfg, arch, 4, checkpoint)
    assert torch.equal(vit.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    assert torch.equal(vit.pos_embed, mae.pos_embed)


def test_knn_features_are_the_trainer_monitors(small):
    """``--mode knn`` and the trainer's ``--knn-every`` see the same features of one checkpoint: the
    pretrained final norm of the mean patch token (not a fresh, untrained fc_norm)."""
    mae, _, paths = small
    checkpoint = torch.load(paths["run"], weights_only=True)
    cfg = ft.recipe(ft.FinetuneConfig(mode="knn", pretrained=str(paths["run"]), train_path="x"), depth=1)
    vit = ft.build_classifier(cfg, ft.architecture(cfg, checkpoint), 4, checkpoint).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        # the same operations on the same weights: equal, not just close
        torch.testing.assert_close(vit.forward_features(x), KnnMonitor.features(mae, x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,extra,message",
    [
        ("junk", [], "junk.pt: not a PyTorch or safetensors checkpoint (neither a zip nor a pickle file"),
        ("run", ["--img-size", "36"], "--img-size 36 is not a multiple of the patch size 8"),
        ("run", ["--num-heads", "3"], "3 heads do not divide the width 32"),
        ("run", ["--mode", "partial", "--trainable-blocks", "5"], "--trainable-blocks must be in [0, 1]"),
        ("wide224", ["--model", "vit_base_patch16"], "embed_dim 32 where the model (--model vit_base_patch16) has 768"),
        ("finetuned_gp", ["--mode", "linear"], "fc_norm, no final norm) cannot make a cls-token model"),
    ],
)
def test_bad_pretrained_or_architecture_is_a_one_line_error(tmp_path, small, capsys, name, extra, message):
    _, data, paths = small
    argv = ["--mode", "knn", "--pretrained", str(paths[name]), "--train-path", str(data), "--run-dir",
            str(tmp_path / "run"), "--num-workers", "0", "--no-progress", *extra]  # fmt: skip
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{ft.PROG}: error: ") and message in err[0], err


def test_a_finetuned_checkpoint_is_a_pretrained_init(tmp_path, small):
    """A fine-tuning checkpoint as ``--pretrained``: its encoder (and global-pool fc_norm) are the init,
    its head is dropped; the architecture comes with it, or from the shapes for one that lacks it."""
    mae, data, paths = small
    common = ["--pretrained", str(paths["run"]), "--train-path", str(data), "--num-workers", "0", "--no-progress",
              "--batch-size", "16", "--lr", "1e-2", "--warmup-epochs", "0", "--epochs", "1", "--max-steps", "1"]  # fmt: skip
    ft.finetune(ft.parse_args(["--mode", "full", *common, "--run-dir", str(tmp_path / "full")]))
    path = next((tmp_path / "full").glob("ckpt-*.pt"))
    checkpoint = torch.load(path, weights_only=True)
    tuned = checkpoint["model"]
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], mae.blocks[0].attn.qkv.weight)  # it trained
    cfg = ft.recipe(ft.FinetuneConfig(mode="knn", pretrained=str(path), train_path="x"), depth=1)
    assert ft.architecture(cfg, checkpoint) == SMALL
    without = {k: v for k, v in checkpoint.items() if k != "architecture"}  # written before it was saved
    assert ft.architecture(dataclasses.replace(cfg, num_heads=2), without) == {
        k: SMALL[k] for k in SMALL if k != "mlp_ratio"
    }
    vit = ft.build_classifier(cfg, SMALL, 4, checkpoint)
    for key in ("blocks.0.attn.qkv.weight", "fc_norm.weight", "fc_norm.bias", "pos_embed"):
        assert torch.equal(vit.state_dict()[key], tuned[key]), key
    assert not torch.equal(vit.head.weight, tuned["head.weight"])  # a fresh head
    result = ft.finetune(ft.parse_args(["--mode", "knn", *common, "--pretrained", str(path), "--knn-k", "5",
                                        "--run-dir", str(tmp_path / "knn")]))  # fmt: skip
    assert result["mode"] == "knn"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--max-steps", "-3"], "--max-steps must be >= 0"),
        (["--lr", "-1"], "--lr must be >= 0"),
        (["--blr", "nan"], "--blr must be a finite number, got nan"),
        (["--layer-decay", "nan"], "--layer-decay must be a finite number"),
        (["--knn-k", "0"], "--knn-k must be >= 1"),
        (["--knn-t", "0"], "--knn-t must be > 0"),
        (["--drop-path", "1.5"], "--drop-path must be in [0, 1)"),
        (["--precision", "bf17"], "--precision must be one of auto, bf16, fp16, fp32"),
        (["--attn-backend", "flash"], "--attn-backend must be one of"),
        (["--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
        (["--min-scale", "0"], "--min-scale must be in (0, 1], got 0.0"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        ft.parse_args(["--train-path", str(tmp_path), "--model", "vit_base_patch16", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and message in err[-1], err


def test_run_time_errors_are_one_line(tmp_path, labelled, capsys, monkeypatch):
    """Too few classes for the labels, a warm-up longer than the run, a run directory that holds a
    run (never overwritten), a diverged run and Ctrl-C: one line each, no traceback."""
    data, pre = labelled
    base = ["--pretrained", str(pre), "--train-path", str(data), "--num-workers", "0", "--no-progress"]
    assert ft.main([*base, "--mode", "knn", "--num-classes", "2", "--run-dir", str(tmp_path / "a")]) == 2
    assert "--num-classes 2 but the labels go up to 3" in capsys.readouterr().err
    assert ft.main([*base, "--mode", "linear", "--epochs", "3", "--run-dir", str(tmp_path / "b")]) == 2
    assert "--warmup-epochs 10 is longer than --epochs 3" in capsys.readouterr().err
    assert ft.main([*base, "--lr", "1e-7", "--run-dir", str(tmp_path / "lr")]) == 2  # the cosine would climb
    assert "--min-lr 1e-06 is above the peak lr 1e-07" in capsys.readouterr().err
    assert ft.main([*base, "--mode", "knn", "--run-dir", str(tmp_path / "c")]) == 0
    before = (tmp_path / "c" / "results.json").read_text()
    assert ft.main([*base, "--mode", "knn", "--init", "random", "--run-dir", str(tmp_path / "c")]) == 2
    assert f"{tmp_path / 'c'} already holds a run: pass another --run-dir" in capsys.readouterr().err
    assert (tmp_path / "c" / "results.json").read_text() == before
    for raised, code, message in (
        (FloatingPointError("non-finite training loss at step 4: lower --blr / --lr"), 1, "non-finite training loss"),
        (
            KeyboardInterrupt(),
            130,
            "interrupted before the run's first checkpoint: nothing to continue",
        ),
    ):
        monkeypatch.setattr(ft, "finetune", lambda cfg, e=raised: (_ for _ in ()).throw(e))
        assert ft.main([*base, "--run-dir", str(tmp_path / "d")]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    (tmp_path / "d").mkdir(exist_ok=True)
    (tmp_path / "d" / "ckpt-step000000004.pt").write_bytes(b"")  # with a checkpoint: how to go on from it
    assert ft.main([*base, "--run-dir", str(tmp_path / "d")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"continue from the last checkpoint with python -m fastmae.finetune --run-dir {tmp_path / 'd'} "
                        "--resume auto"), err  # fmt: skip


def test_a_guessed_head_count_is_said(tmp_path, capsys):
    """Official-layout weights do not say their heads: the guess by width is printed."""
    mae = MaskedAutoencoderViT(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4)
    checkpoint = {"model": mae.state_dict()}
    ft.architecture(ft.FinetuneConfig(train_path="x"), checkpoint)
    assert "guessed num_heads=1 (the checkpoint does not say; --num-heads if wrong)" in capsys.readouterr().out
    ft.architecture(ft.FinetuneConfig(train_path="x", num_heads=4), checkpoint)
    assert "guessed" not in capsys.readouterr().out


def _named_classes(root, names, per_class: int = 3, size: int = 32):
    """An ImageFolder of the classes ``names``; a class's images are the same under any root."""
    for name in names:
        (root / name).mkdir(parents=True)
        rng = np.random.default_rng(sum(map(ord, name)))
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_validation_classes_are_the_training_classes_by_name(tmp_path, small, capsys):
    """A validation tree with fewer classes numbers its folders from 0 (cat, dog = 0, 1 where the
    training tree has bird, cat, dog = 0, 1, 2): its labels are matched by name, so kNN with k = 1
    on the training images themselves is 100%, not 0%. A class the training set lacks, or a list's
    label beyond the training classes, is one line."""
    _, _, paths = small
    train = _named_classes(tmp_path / "train", ["bird", "cat", "dog"])
    val = _named_classes(tmp_path / "val", ["cat", "dog"])
    base = ["--mode", "knn", "--pretrained", str(paths["run"]), "--train-path", str(train), "--knn-k", "1",
            "--num-workers", "0", "--no-progress"]  # fmt: skip
    result = ft.finetune(ft.parse_args([*base, "--val-path", str(val), "--run-dir", str(tmp_path / "a")]))
    assert result["top1"] == 100.0
    cfg = ft.parse_args([*base, "--val-path", str(val)])
    assert sorted({y for _, y in ft.open_splits(cfg)[1].samples}) == [1, 2]
    _named_classes(tmp_path / "val2", ["cat", "cow"])
    assert ft.main([*base, "--val-path", str(tmp_path / "val2"), "--run-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the validation class cow of" in err[0] and "not among the 3 training classes" in err[0]
    (tmp_path / "val.txt").write_text("cat/0.png 1\ndog/0.png 3\n")  # a list's labels are the classes
    argv = [*base, "--val-path", str(val), "--val-list", str(tmp_path / "val.txt"), "--run-dir", str(tmp_path / "c")]
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the validation labels go up to 3 but the training set has 3 classes" in err[0], err
    (tmp_path / "val.txt").write_text("cat/0.png 1\ndog/0.png 2\n")
    assert ft.finetune(ft.parse_args(argv))["top1"] == 100.0


def test_the_recipes_mixup_cutmix_and_erasing_are_on_and_it_learns(tmp_path, labelled, monkeypatch, capsys):
    """Full fine-tuning's recipe (RandAugment in the loader, tested in tests/data) mixes every batch
    (mixup 0.8 / CutMix 1.0, soft targets) and erases a quarter of the images, as the official code;
    it still learns the four colours."""
    data, pre = labelled
    calls: list[str] = []  # in order, every step
    mix_call, erase, soft_ce = ft.Mixup.__call__, ft.random_erase, ft.soft_target_cross_entropy

    def counted_mix(self, images, labels, rng):
        calls.append("mix")
        return mix_call(self, images, labels, rng)

    def counted_erase(images, prob, rng, generator):
        calls.append("erase")
        assert prob == 0.25
        return erase(images, prob, rng, generator)

    def counted_soft_ce(logits, target):
        calls.append("soft_ce")
        assert target.shape == logits.shape and not torch.equal(target, target.round())  # smoothed / mixed
        return soft_ce(logits, target)

    monkeypatch.setattr(ft, "soft_target_cross_entropy", counted_soft_ce)
    monkeypatch.setattr(ft.Mixup, "__call__", counted_mix)
    monkeypatch.setattr(ft, "random_erase", counted_erase)
    result, run_dir = run_finetune(tmp_path, data, pre, "full", "--blr", "2e-2", "--epochs", "4", "--warmup-epochs",
                                   "1", "--drop-path", "0")  # fmt: skip
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["mixup"], config["cutmix"], config["reprob"], config["smoothing"]) == (0.8, 1.0, 0.25, 0.1)
    assert config["aa"] == "rand-m9-mstd0.5-inc1"
    # each step: erasing (the transform's), then the batch's mix, then the soft-target loss
    assert calls == ["erase", "mix", "soft_ce"] * result["step"] and result["step"] == 16  # 4 epochs of 4
    assert result["top1"] >= 75  # measured 100 (4 classes)
    with pytest.raises(ft.ConfigError, match="--batch-size must be even, got 15"):
        ft.finetune(ft.parse_args(["--mode", "full", "--pretrained", str(pre), "--train-path", str(data),
                                   "--batch-size", "15", "--run-dir", str(tmp_path / "odd")]))  # fmt: skip
    for argv, message in (
        (["--data-backend", "dali"], "RandAugment (--aa rand-m9-mstd0.5-inc1) runs in the torch loader"),
        (["--aa", "rand-m9-x1"], "--aa: unknown RandAugment section 'x1'"),
    ):
        argv = ["--mode", "full", "--pretrained", str(pre), "--train-path", str(data), *argv, "--run-dir",
                str(tmp_path / "refused")]  # fmt: skip
        try:
            code = ft.main(argv)
        except SystemExit as e:  # refused while parsing
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    # a run from before these flags trained without them, and resumes so
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps({"mode": "full"}))
    assert {k: ft.saved_config(tmp_path / "old")[k] for k in ("mixup", "cutmix", "reprob", "aa")} == {
        "mixup": 0.0,
        "cutmix": 0.0,
        "reprob": 0.0,
        "aa": "",
    }
