"""``python -m fastmae.finetune``: each mode trains on a tiny labelled set and the loss falls."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae import finetune as ft
from fastmae.knn import KnnMonitor
from fastmae.log import read_metrics
from fastmae.model import MaskedAutoencoderViT
from fastmae.vit import VisionTransformer

REPO = Path(__file__).resolve().parents[1]
ARCH = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=4.0)


def _color_classes(root, per_class: int = 24, size: int = 40):
    """An ImageFolder of 4 classes told apart by colour (noisy), learnable in a few dozen steps."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for k, c in enumerate(colours):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(c) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{k}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    data = _color_classes(root / "data")
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**{k: v for k, v in ARCH.items() if k != "mlp_ratio"}, decoder_embed_dim=32,
                               decoder_depth=1, decoder_num_heads=4)  # fmt: skip
    pre = root / "ckpt.pt"
    torch.save({"model": mae.state_dict(), "config": ARCH, "step": 1}, pre)  # a fastmae run checkpoint's layout
    return data, pre


def _run(tmp_path, data, pre, mode, *extra):
    run_dir = tmp_path / f"run-{mode}"
    argv = ["--mode", mode, "--pretrained", str(pre), "--train-path", str(data), "--run-dir", str(run_dir),
            "--batch-size", "16", "--num-workers", "0", "--no-progress", "--log-every", "2", *extra]  # fmt: skip
    result = ft.finetune(ft.parse_args(argv))
    assert json.loads((run_dir / "results.json").read_text()) == pytest.approx(result)
    return result, run_dir


@pytest.mark.parametrize(
    "mode,extra",
    [
        ("full", ["--blr", "2e-2", "--epochs", "4", "--warmup-epochs", "1", "--drop-path", "0"]),
        ("partial", ["--blr", "4e-2", "--epochs", "4", "--warmup-epochs", "1", "--trainable-blocks", "1"]),
        ("linear", ["--optimizer", "adamw", "--lr", "3e-2", "--epochs", "4", "--warmup-epochs", "1"]),
    ],
)
def test_each_mode_trains_and_the_loss_falls(tmp_path, labelled, mode, extra):
    data, pre = labelled
    result, run_dir = _run(tmp_path, data, pre, mode, *extra)
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
    flat_result, run_dir = _run(tmp_path / "a", data, pre, "linear", *common)
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if line.startswith("warning: LARS at lr 0.00625"))
    flat = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert max(flat) - min(flat) < 0.02 * flat[0], flat  # the head stayed where it started
    advice = warning.split("use e.g. ")[1].split()
    result, run_dir = _run(tmp_path / "b", data, pre, "linear", *common, *advice)
    assert "warning: LARS" not in capsys.readouterr().out
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert losses[-1] < 0.92 * losses[0], losses  # measured 0.90
    assert result["top1"] >= 75 > flat_result["top1"]  # measured 100 against 30 (4 classes)


def test_knn_mode_evaluates_without_training(tmp_path, labelled):
    data, pre = labelled
    result, run_dir = _run(tmp_path, data, pre, "knn")
    assert result["mode"] == "knn" and result["k"] == 20 and 0.0 <= result["top1"] <= 100.0
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


def test_a_run_from_before_min_scale_resumes_at_its_scale(tmp_path):
    """A config.json written before --min-scale existed: its run cropped at pretraining's 0.2."""
    (tmp_path / "config.json").write_text(json.dumps({"mode": "full", "batch_size": 16}))
    assert ft.saved_config(tmp_path)["min_scale"] == 0.2
    (tmp_path / "config.json").write_text(json.dumps({"mode": "full", "min_scale": 0.08}))
    assert ft.saved_config(tmp_path)["min_scale"] == 0.08
    assert ft.saved_config(tmp_path / "none") == {}


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
        _run(tmp_path / str(len(seen)), data, pre, "linear", "--epochs", "1", "--warmup-epochs", "0", "--max-steps",
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
        _, run_dir = _run(tmp_path / precision, data, pre, "full", "--precision", precision, "--lr", "1e-3",
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


def test_resume_auto_continues_from_the_last_epoch(tmp_path, labelled):
    data, pre = labelled
    common = ["--lr", "1e-3", "--warmup-epochs", "1", "--drop-path", "0"]
    _, run_dir = _run(tmp_path, data, pre, "full", *common, "--epochs", "1")
    first = read_metrics(run_dir / "metrics.jsonl")
    # tag the first run's records: a resumed run keeps them, a run that started over would rewrite them
    first = [{**r, "first_run": True} for r in first]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    _run(tmp_path, data, pre, "full", *common, "--epochs", "2", "--resume", "auto")
    both = read_metrics(run_dir / "metrics.jsonl")
    assert both[: len(first)] == first  # the first epoch's records are kept, not redone
    assert not any("first_run" in r for r in both[len(first) :])
    assert both[-1]["step"] == 2 * first[-1]["step"] and both[-1]["epoch"] == 2.0
    assert len(list(run_dir.glob("ckpt-*.pt"))) == 1
    # The resumed run is the uninterrupted one: weights, optimizer state and RNG all restored. (The
    # first epoch is all warm-up, whose lr does not depend on --epochs.) Same ops, same order, on
    # CPU: every loss and metric is bit-identical, so compared exactly.
    result, _ = _run(tmp_path / "uninterrupted", data, pre, "full", *common, "--epochs", "2")
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
    _, run_dir = _run(tmp_path, data, pre, "full", *common)
    config = (run_dir / "config.json").read_text()
    with pytest.raises(ft.ConfigError, match="--min-lr 0.5 is above the peak lr 0.001"):
        ft.finetune(ft.parse_args(["--run-dir", str(run_dir), "--resume", "auto", "--min-lr", "0.5"]))
    with pytest.raises(ft.ConfigError, match=r"effective batch of 16 .*this run has 8 \(8 x 1\)"):
        ft.finetune(ft.parse_args(["--run-dir", str(run_dir), "--resume", "auto", "--batch-size", "8",
                                   "--epochs", "2"]))  # fmt: skip
    more = _color_classes(tmp_path / "more", per_class=48)  # the same classes, twice the images
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


def test_two_processes_match_one(tmp_path, labelled):
    """torchrun, 2 gloo processes x 8 vs 1 process x 16: the same training losses and the same
    validation accuracy (each val image is scored once, on one rank, and the counts are summed)."""
    data, pre = labelled
    common = ["--mode", "full", "--pretrained", str(pre), "--train-path", str(data), "--num-workers", "0",
              "--no-progress", "--log-every", "1", "--lr", "1e-3", "--epochs", "1", "--warmup-epochs", "0",
              "--drop-path", "0", "--smoothing", "0"]  # fmt: skip
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


SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=4.0)


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


SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, mlp_ratio=4.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A width-32, 1-block MAE with a non-trivial final norm, in the layouts ``--pretrained`` takes,
    and files it refuses."""
    root = tmp_path_factory.mktemp("small")
    data = _color_classes(root / "data", per_class=8, size=32)
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**{k: v for k, v in SMALL.items() if k != "mlp_ratio"}, decoder_embed_dim=32,
                               decoder_depth=1, decoder_num_heads=2).eval()  # fmt: skip
    with torch.no_grad():
        mae.norm.weight.uniform_(0.5, 1.5)
        mae.norm.bias.uniform_(-0.5, 0.5)
    sd = mae.state_dict()
    enc = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    paths = {name: root / f"{name}.pt" for name in ("run", "easycv", "ddp", "wide224", "finetuned_gp", "junk")}
    torch.save({"model": sd, "config": SMALL, "step": 1}, paths["run"])
    torch.save({"state_dict": {"encoder." + k: v for k, v in enc.items()}}, paths["easycv"])
    torch.save({"model": {"module." + k: v for k, v in sd.items()}}, paths["ddp"])
    # ViT-B/16's patch grid at 224 px, but 32 wide
    wide = MaskedAutoencoderViT(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                                decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    torch.save({"model": wide.state_dict()}, paths["wide224"])
    classifier = VisionTransformer(**SMALL, num_classes=4, global_pool=True)  # a fine-tuned global-pool model
    torch.save({"model": classifier.state_dict(), "config": ft.to_dict(ft.FinetuneConfig())}, paths["finetuned_gp"])
    paths["junk"].write_text("not a checkpoint\n")
    return mae, data, paths


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
        ("junk", [], "--pretrained: cannot read"),
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


@pytest.mark.parametrize("drop_path", ["0", "0.2"])
def test_sigterm_saves_and_the_resumed_run_is_the_uninterrupted_one(tmp_path, labelled, capsys, monkeypatch, drop_path):
    """A scheduler's SIGTERM mid-epoch: the run stops at the next log step after a checkpoint, with
    one line and exit 143; --resume auto then gives the uninterrupted run's records, bit for bit.
    Drop path draws from torch's global RNG, which the checkpoint restores: nothing else may draw
    from it between the two (a DataLoader's iterator drew its base seed there, one draw more in the
    resumed run, and the drop-path masks moved)."""
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
