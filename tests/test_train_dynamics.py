"""Training-dynamics parity: the trainer's 50 steps against Hugging Face ViTMAE in a plain loop.

The trainer runs as users run it (``main``: real loader, AdamW groups, per-step schedule, fp32 on
CPU). Hugging Face's ``ViTMAEForPreTraining``, converted from the trainer's initial weights with
``fastmae.convert.to_hf`` (sdpa attention), is trained in a hand-written loop on the same batches
and masking noise, with AdamW built by the same grouping rule on HF's own parameter names (split
q/k/v changes nothing for an element-wise optimizer). The per-step losses must agree within 2e-6
relative (the issue asks 1e-4; measured 2e-7, float32 rounding in another order): what the trainer
adds to the model (accumulation, schedule, noise slicing, weight-decay groups) is faithful. At 1e-4
an AdamW eps of 1e-7, or three weight-decay groups wrong, passed.
"""

from __future__ import annotations

import pytest
import torch

from fastmae.config import learning_rate, make_config
from fastmae.convert import to_hf
from fastmae.data import build_loader, open_source
from fastmae.model import param_groups_weight_decay
from fastmae.train import build_model, lr_at, main, masking_noise
from tests.training import losses, tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 50


def _overrides(argv: list[str]) -> dict:
    """The Config fields a TINY argv sets (the same values the trainer parses)."""
    from fastmae.config import parse_config

    return parse_config(argv).to_dict()


def test_fifty_steps_match_hugging_face(tiny_data, tmp_path):  # noqa: F811
    pytest.importorskip("transformers")
    argv = tiny_args(tiny_data, tmp_path / "run", "--epochs", "7", "--max-steps", str(STEPS), "--lr", "2e-3")
    assert main(argv) == 0
    trainer_losses = [loss for _, loss in losses(tmp_path / "run")]
    assert len(trainer_losses) == STEPS

    cfg = make_config(_overrides(argv))
    model = build_model(cfg, torch.device("cpu"))  # the trainer's initial weights (seeded)
    hf = to_hf(model, mask_ratio=cfg.mask_ratio, attn_implementation="sdpa")
    hf.train()
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(hf, cfg.weight_decay), lr=learning_rate(cfg, 1), betas=cfg.betas
    )
    loader = build_loader(
        "torch", open_source(cfg.data_path), batch_size=cfg.batch_size, image_size=cfg.img_size, num_workers=0
    )
    gen = torch.Generator()
    hf_losses = []
    step = 0
    for epoch in range(cfg.epochs):
        loader.set_epoch(epoch)
        for i, (images, _) in enumerate(loader):
            if step == STEPS:
                break
            lr = lr_at(epoch + i / len(loader), learning_rate(cfg, 1), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            noise = masking_noise(gen, cfg.seed, step, cfg.batch_size, model.num_patches)
            loss = hf(pixel_values=images, noise=noise).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            hf_losses.append(loss.item())
            step += 1

    assert trainer_losses[-1] < 0.9 * trainer_losses[0]  # the runs moved
    for s, (a, b) in enumerate(zip(trainer_losses, hf_losses, strict=True), start=1):
        assert a == pytest.approx(b, rel=2e-6), f"step {s}: fastmae {a:.8f} vs HF {b:.8f}"
