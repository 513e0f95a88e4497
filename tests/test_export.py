"""``python -m fastmae.export``: a run checkpoint to timm / MAE / HF files that load back."""

from __future__ import annotations

import pytest
import torch

from fastmae.convert import load_official, load_safetensors
from fastmae.export import main
from fastmae.model import MaskedAutoencoderViT
from fastmae.vit import VisionTransformer

ARCH = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=True)  # fmt: skip


@pytest.fixture
def run_checkpoint(tmp_path):
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(**ARCH)
    path = tmp_path / "ckpt-step000000010.pt"
    torch.save({"model": mae.state_dict(), "config": {**ARCH, "preset": "demo"}, "step": 10}, path)
    return mae, path


def test_timm_safetensors_export_loads_into_the_vit(run_checkpoint, tmp_path, capsys):
    mae, path = run_checkpoint
    out = tmp_path / "enc.safetensors"
    assert main([str(path), "--to", "timm", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    sd = load_safetensors(out)
    assert "fc_norm.weight" in sd and "norm.weight" not in sd and "mask_token" not in sd
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0)
    vit.load_state_dict(sd, strict=True)  # the same keys timm's avg-pool ViT has
    x = torch.randn(2, 3, 32, 32)
    tokens = mae.eval().forward_features(x, norm=False)
    torch.testing.assert_close(vit.eval().forward_features(x), mae.norm(tokens[:, 1:].mean(1)))


def test_mae_export_is_an_official_checkpoint(run_checkpoint, tmp_path):
    mae, path = run_checkpoint
    out = tmp_path / "mae.pth"
    assert main([str(path), "--to", "mae", "--out", str(out)]) == 0
    fresh = MaskedAutoencoderViT(**ARCH)
    report = load_official(fresh, out)
    assert not report.missing and not report.unexpected
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), mae.state_dict().values(), strict=True))


def test_hf_export_round_trips(run_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    mae, path = run_checkpoint
    out = tmp_path / "hf"
    assert main([str(path), "--to", "hf", "--out", str(out)]) == 0
    hf = transformers.ViTMAEForPreTraining.from_pretrained(out)
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.decoder_num_attention_heads == 16
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    torch.testing.assert_close(hf(pixel_values=imgs, noise=noise).logits, mae(imgs, noise=noise)[1])


@pytest.mark.parametrize("to,name", [("timm", "enc.safetensors"), ("timm-cls", "cls.safetensors"), ("hf", "hf")])
def test_exports_get_the_mode_the_umask_gives(run_checkpoint, tmp_path, to, name):
    """safetensors writes 0600: on a shared machine colleagues could not read an export."""
    import os
    import stat

    if to == "hf":
        pytest.importorskip("transformers")
    _, path = run_checkpoint
    old = os.umask(0o027)
    try:
        assert main([str(path), "--to", to, "--out", str(tmp_path / name)]) == 0
    finally:
        os.umask(old)
    files = sorted((tmp_path / name).glob("*.safetensors")) if to == "hf" else [tmp_path / name]
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o640 for f in files)


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.pth")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    """The error line of a ``parser.error`` exit (usage lines before it, no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(SystemExit) as e:
        main([str(junk), "--out", str(tmp_path / "x.pth")])
    line = _one_line_error(capsys)
    assert e.value.code == 2 and line.startswith("python -m fastmae.export: error: cannot read") and str(junk) in line


def test_cls_token_classifier_is_refused_as_timm_avg(tmp_path, capsys):
    """A linear probe reads the normed cls token: as timm's avg-pool model (fc_norm) it would compute
    another function, so ``--to timm`` is refused and ``--to timm-cls`` keeps its logits."""
    torch.manual_seed(0)
    probe = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                              global_pool=False, linear_probe=True).eval()  # fmt: skip
    path = tmp_path / "probe.pt"
    torch.save({"model": probe.state_dict()}, path)
    with pytest.raises(SystemExit) as e:
        main([str(path), "--to", "timm", "--out", str(tmp_path / "avg.safetensors")])
    assert e.value.code == 2 and "--to timm-cls" in _one_line_error(capsys)
    assert not (tmp_path / "avg.safetensors").exists()
    assert main([str(path), "--to", "timm-cls", "--out", str(tmp_path / "cls.safetensors")]) == 0
    timm = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                             global_pool=False).eval()  # fmt: skip
    timm.load_state_dict(load_safetensors(tmp_path / "cls.safetensors"), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(timm(x), probe(x))


def test_hugging_face_input_is_converted_and_unknown_layouts_refused(run_checkpoint, tmp_path, capsys):
    """HF ``model.safetensors`` (as save_pretrained writes it) exports under fastmae / timm names, the
    same tensors as the fastmae checkpoint's export; a layout that is neither is an error."""
    pytest.importorskip("transformers")
    from fastmae.convert import to_hf

    mae, path = run_checkpoint
    to_hf(mae).save_pretrained(tmp_path / "hf")
    for fmt, name in (("timm", "t.safetensors"), ("mae", "m.pth")):
        assert (
            main([str(tmp_path / "hf" / "model.safetensors"), "--to", fmt, "--out", str(tmp_path / ("hf-" + name))])
            == 0
        )
        assert main([str(tmp_path / "hf"), "--to", fmt, "--out", str(tmp_path / ("folder-" + name))]) == 0
        assert main([str(path), "--to", fmt, "--out", str(tmp_path / ("ours-" + name))]) == 0
    a, b = load_safetensors(tmp_path / "hf-t.safetensors"), load_safetensors(tmp_path / "ours-t.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_safetensors(tmp_path / "folder-t.safetensors")
    assert c.keys() == b.keys() and all(torch.equal(c[k], b[k]) for k in c)
    a = torch.load(tmp_path / "hf-m.pth", weights_only=True)["model"]
    assert a.keys() == mae.state_dict().keys() and all(torch.equal(a[k], v) for k, v in mae.state_dict().items())
    other = tmp_path / "other.pt"
    torch.save({"model": {"features.0.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(SystemExit) as e:
        main([str(other), "--out", str(tmp_path / "o.pth")])
    assert e.value.code == 2 and "unknown keys features.0.weight: accepted are" in _one_line_error(capsys)
    assert not (tmp_path / "o.pth").exists()


def test_hf_out_that_is_a_file_is_refused(run_checkpoint, tmp_path, capsys):
    _, path = run_checkpoint
    out = tmp_path / "taken"
    out.write_text("keep me\n")
    with pytest.raises(SystemExit) as e:
        main([str(path), "--to", "hf", "--out", str(out)])
    assert e.value.code == 2 and "exists and is not a folder" in _one_line_error(capsys)
    assert out.read_text() == "keep me\n"
    with pytest.raises(SystemExit) as e:  # and a folder where a file format goes
        main([str(path), "--to", "timm", "--out", str(tmp_path)])
    assert e.value.code == 2 and f"--out {tmp_path} is a folder; --to timm writes a file" in _one_line_error(capsys)
    assert out.read_text() == "keep me\n"


def test_hf_head_counts_are_given_or_the_guess_is_printed(tmp_path, capsys):
    """Head counts are not in the weights: an official-layout checkpoint (no config) says them by
    --num-heads / --decoder-num-heads, else the guess is printed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                               decoder_depth=1, decoder_num_heads=2).eval()  # fmt: skip
    path = tmp_path / "official.pth"
    torch.save({"model": mae.state_dict()}, path)
    assert main([str(path), "--to", "hf", "--out", str(tmp_path / "guessed")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("guessed num_heads=1, decoder_num_heads=16 (the checkpoint does not say; "
                      "--num-heads / --decoder-num-heads if wrong)")  # fmt: skip
    argv = [str(path), "--to", "hf", "--out", str(tmp_path / "given"), "--num-heads", "2", "--decoder-num-heads", "2"]
    assert main(argv) == 0
    assert "guessed" not in capsys.readouterr().out
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "given").eval()
    assert (hf.config.num_attention_heads, hf.config.decoder_num_attention_heads) == (2, 2)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=imgs, noise=noise).logits, mae(imgs, noise=noise)[1])
    # a Hugging Face folder says its heads in its config.json: nothing is guessed
    assert main([str(tmp_path / "given"), "--to", "hf", "--out", str(tmp_path / "again")]) == 0
    assert "guessed" not in capsys.readouterr().out
    again = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "again")
    assert (again.config.num_attention_heads, again.config.decoder_num_attention_heads) == (2, 2)
