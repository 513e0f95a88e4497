"""``--mode eval`` (scoring a fine-tuned classifier, head and all) and fine-tuning at another image
size than the checkpoint's (the position embedding resampled as the official code does)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastmae import finetune as ft
from fastmae.data.eval import eval_transform
from fastmae.pos_embed import interpolate_pos_embed, sincos_pos_embed_tensor
from fastmae.vit import VisionTransformer
from tests.finetuning import run_finetune

FULL = ("--blr", "2e-2", "--epochs", "4", "--warmup-epochs", "1", "--drop-path", "0")
LINEAR = ("--optimizer", "adamw", "--lr", "3e-2", "--epochs", "3", "--warmup-epochs", "1")


# ------------------------------------------------------------------------------ interpolation


def test_interpolation_keeps_the_cls_row_and_the_grid_orientation():
    """Channels that vary along the rows only, along the columns only, and not at all come back so at
    the new grid (a transposed or wrongly flattened grid mixes them), and the cls row is kept."""
    old, new = 6, 9
    rows, cols = torch.meshgrid(torch.arange(old, dtype=torch.float32), torch.arange(old, dtype=torch.float32),
                                indexing="ij")  # fmt: skip
    field = torch.stack([rows**2, torch.sin(cols), torch.full_like(rows, 0.75)], dim=-1).reshape(1, old * old, 3)
    cls = torch.tensor([[[7.0, -3.0, 0.25]]])
    out = interpolate_pos_embed(torch.cat([cls, field], dim=1), new)
    assert out.shape == (1, 1 + new * new, 3) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], cls[:, 0])
    grid = out[0, 1:].reshape(new, new, 3)
    torch.testing.assert_close(grid[:, :, 0], grid[:, :1, 0].expand(new, new), rtol=0, atol=1e-5)  # rows only
    torch.testing.assert_close(grid[:, :, 1], grid[:1, :, 1].expand(new, new), rtol=0, atol=1e-6)  # columns only
    torch.testing.assert_close(grid[:, :, 2], torch.full((new, new), 0.75), rtol=0, atol=1e-6)
    assert grid[:, 0, 0].diff().min() > 0  # rows**2 still grows down the rows


def official_interpolate_pos_embed(model, checkpoint_model):
    """facebookresearch/mae ``util/pos_embed.py``'s ``interpolate_pos_embed``, as released (the print
    dropped): the behaviour fastmae's fine-tuning follows."""
    if "pos_embed" in checkpoint_model:
        pos_embed_checkpoint = checkpoint_model["pos_embed"]
        embedding_size = pos_embed_checkpoint.shape[-1]
        num_patches = model.patch_embed.num_patches
        num_extra_tokens = model.pos_embed.shape[-2] - num_patches
        orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
        new_size = int(num_patches**0.5)
        if orig_size != new_size:
            extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
            pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
            pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
            pos_tokens = torch.nn.functional.interpolate(
                pos_tokens, size=(new_size, new_size), mode="bicubic", align_corners=False
            )
            pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
            new_pos_embed = torch.cat((extra_tokens, pos_tokens), dim=1)
            checkpoint_model["pos_embed"] = new_pos_embed


@pytest.mark.parametrize("old,new", [(14, 24), (14, 7), (4, 6)])
def test_interpolation_is_the_official_codes(old, new):
    pe = torch.randn(1, 1 + old * old, 40)
    model = VisionTransformer(img_size=new * 8, patch_size=8, embed_dim=40, depth=1, num_heads=2, num_classes=0)
    sd = {"pos_embed": pe}
    official_interpolate_pos_embed(model, sd)
    assert torch.equal(interpolate_pos_embed(pe, new), sd["pos_embed"])


def test_interpolation_is_the_identity_on_the_same_grid_and_keeps_the_dtype():
    pe = sincos_pos_embed_tensor(32, 4).bfloat16()
    assert interpolate_pos_embed(pe, 4) is pe
    small = interpolate_pos_embed(pe, 3)
    assert small.dtype == torch.bfloat16 and small.shape == (1, 10, 32)
    # computed in float32 and rounded once
    want = interpolate_pos_embed(pe.float(), 3).bfloat16()
    assert torch.equal(small, want)
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(pe[:, :-1], 3)


@pytest.mark.interop
def test_interpolation_matches_timm_without_antialiasing():
    """timm's resampler (another implementation) with the official code's settings: bicubic, no
    antialiasing, one prefix token; up (14 -> 24, fine-tuning at 384) and down (14 -> 7)."""
    timm_layers = pytest.importorskip("timm.layers")
    pe = torch.randn(1, 1 + 14 * 14, 40)
    for grid in (24, 7):
        want = timm_layers.resample_abs_pos_embed(pe, [grid, grid], num_prefix_tokens=1, interpolation="bicubic",
                                                  antialias=False)  # fmt: skip
        torch.testing.assert_close(interpolate_pos_embed(pe, grid), want, rtol=0, atol=0)


def test_finetuning_at_another_image_size_resamples_the_checkpoints_pos_embed(tmp_path, small, capsys):
    """A 32 px checkpoint (4x4 patches) fine-tuned at 48 px: the model starts from the resampled
    embedding (the run said no, before), and the run goes through at 48 px."""
    mae, data, paths = small
    cfg = ft.parse_args(["--mode", "linear", "--pretrained", str(paths["run"]), "--train-path", str(data),
                         "--img-size", "48"])  # fmt: skip
    checkpoint = ft.load_pretrained(cfg)
    arch = ft.architecture(cfg, checkpoint)
    vit = ft.build_classifier(ft.recipe(cfg, arch["depth"]), arch, 4, checkpoint)
    assert "interpolated from 4x4 to 6x6 patches" in capsys.readouterr().out
    assert torch.equal(vit.pos_embed.data, interpolate_pos_embed(mae.pos_embed.data, 6))
    assert torch.equal(vit.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)
    result, run_dir = run_finetune(tmp_path, data, paths["run"], "knn", "--img-size", "48")
    assert json.loads((run_dir / "config.json").read_text())["architecture"]["img_size"] == 48
    assert result["mode"] == "knn" and 0 <= result["top1"] <= 100


# -------------------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def trained(labelled, tmp_path_factory):
    """A full fine-tune and a linear probe of ``labelled``'s checkpoint, each validated on the whole
    training folder, so that ``--mode eval`` on that folder must give their final scores."""
    data, pre = labelled
    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for mode, extra in (("full", FULL), ("linear", LINEAR)):
        result, run_dir = run_finetune(root / mode, data, pre, mode, *extra, "--val-path", str(data))
        (ckpt,) = run_dir.glob("ckpt-*.pt")
        runs[mode] = result, ckpt
    return data, runs


def run_eval(tmp_path, pretrained, val, *extra):
    run_dir = tmp_path / "eval"
    argv = ["--mode", "eval", "--pretrained", str(pretrained), "--val-path", str(val), "--run-dir", str(run_dir),
            "--batch-size", "16", "--num-workers", "0", *extra]  # fmt: skip
    result = ft.finetune(ft.parse_args(argv))
    assert json.loads((run_dir / "results.json").read_text()) == pytest.approx(result)
    return result


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_eval_scores_a_checkpoint_as_its_run_did(tmp_path, trained, mode, capsys):
    data, runs = trained
    (finetuned, ckpt) = runs[mode]
    assert finetuned["top1"] > 50  # trained (4 classes): a head left at its init would not score this
    result = run_eval(tmp_path, ckpt, data)
    assert result["top1"] == finetuned["top1"] and result["top5"] == finetuned["top5"]
    assert result["n_val"] == finetuned["n_val"] == 96
    out = capsys.readouterr().out
    assert ("global pool" if mode == "full" else "cls token, probe head") in out
    # the official layout, {'model': state dict} and nothing else: the same classifier, the same score
    official = tmp_path / "official.pth"
    torch.save({"model": torch.load(ckpt, weights_only=True)["model"]}, official)
    assert run_eval(tmp_path / "official", official, data)["top1"] == finetuned["top1"]


def test_eval_matches_validation_classes_by_name(tmp_path, trained):
    """A validation tree with two of the four classes (class3, class1: ImageFolder numbers them 0,
    1) is scored against the classes the run's checkpoint names, as each image's prediction says."""
    data, runs = trained
    _, ckpt = runs["full"]
    val = tmp_path / "val"
    for name in ("class3", "class1"):
        shutil.copytree(data / name, val / name)
    result = run_eval(tmp_path, ckpt, val)
    state = torch.load(ckpt, weights_only=True)
    assert state["classes"] == ["class0", "class1", "class2", "class3"]
    vit = VisionTransformer(**state["architecture"], num_classes=4, global_pool=True).eval()
    vit.load_state_dict(state["model"])
    hits = []
    for name in ("class1", "class3"):
        for path in sorted((val / name).iterdir()):
            with torch.no_grad():
                pred = vit(eval_transform(str(path), 32)[None]).argmax(1).item()
            hits.append(pred == int(name[-1]))
    assert result["n_val"] == len(hits) == 48
    assert result["top1"] == pytest.approx(100.0 * sum(hits) / len(hits))
    assert sum(hits) > len(hits) / 2  # trained: the folders' own labels (0, 1) would score near 0


def test_eval_at_another_image_size_resamples(tmp_path, trained, capsys, monkeypatch):
    """... and compiles where training would (here asked for: the same rule as training's)."""
    data, runs = trained
    compiled = []
    monkeypatch.setattr(ft.torch, "compile", lambda model: compiled.append(model) or model)
    result = run_eval(tmp_path, runs["full"][1], data, "--img-size", "48", "--compile")
    assert len(compiled) == 1
    assert "interpolated from 4x4 to 6x6 patches" in capsys.readouterr().out
    assert result["n_val"] == 96


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("encoder", [], "has no classification head (head.weight)"),
        ("full", ["--no-global-pool"], "is a global-pool classifier (fc_norm present): drop --no-global-pool"),
        ("no_val", [], "--mode eval needs --val-path"),
        ("full", ["--resume", "auto"], "nothing to --resume"),
        ("labels", [], "the validation labels go up to 6 but the classifier has 4 outputs"),
        ("subset", [], "has 2 class folders where the classifier has 4 outputs, and --pretrained names no classes"),
        ("nonsquare", [], "pos_embed has 21 rows: not a cls row and a square patch grid"),
    ],
)
def test_eval_refusals_are_one_line_errors(tmp_path, trained, labelled, capsys, case, extra, message):
    data, runs = trained
    pretrained = labelled[1] if case == "encoder" else runs["full"][1]
    weights = torch.load(runs["full"][1], weights_only=True)["model"]
    if case in ("labels", "subset", "nonsquare"):  # no class names in the checkpoint (the official layout)
        pretrained = tmp_path / "official.pth"
        if case == "nonsquare":  # 1 + 4 x 5 positions
            weights = {**weights, "pos_embed": torch.randn(1, 21, weights["pos_embed"].shape[-1])}
        torch.save({"model": weights}, pretrained)
    if case == "labels":  # a list whose labels go past its head
        (tmp_path / "val.txt").write_text("class0/0.png 0\nclass1/0.png 6\n")
        extra = ["--val-list", str(tmp_path / "val.txt")]
    if case == "subset":  # two of the four class folders: ImageFolder would number them 0 and 1
        for name in ("class1", "class3"):
            shutil.copytree(data / name, tmp_path / "sub" / name)
        extra = ["--val-path", str(tmp_path / "sub")]
    argv = ["--mode", "eval", "--pretrained", str(pretrained), "--run-dir", str(tmp_path / "run"), "--num-workers",
            "0", *([] if case == "no_val" else ["--val-path", str(data)]), *extra]  # fmt: skip
    try:
        code = ft.main(argv)
    except SystemExit as e:  # refused while parsing, as argparse does
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"{ft.PROG}: error: ") and message in err[0], err
