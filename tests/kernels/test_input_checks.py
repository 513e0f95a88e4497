"""The ops' input checks: one clear ValueError for a wrong rank, a float index, another device;
int32 indices give what int64 ones give."""

from __future__ import annotations

import pytest
import torch

from fastmae.kernels import encoder_input, masked_mse, patch_gather, unshuffle


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    N, P, D, L, K = 2, 8, 16, 16, 4
    imgs = torch.randn(N, 3, 32, 32, generator=g).to(device)
    ids_shuffle = torch.argsort(torch.rand(N, L, generator=g), dim=1).to(device)
    ids_keep, ids_restore = ids_shuffle[:, :K], torch.argsort(ids_shuffle, dim=1)
    x = torch.randn(N, K, D, generator=g).to(device)
    cls, pos = torch.randn(1, 1, D, generator=g).to(device), torch.randn(1, 1 + L, D, generator=g).to(device)
    pred = torch.randn(N, L, 3 * P * P, generator=g).to(device)
    mask = torch.ones(N, L, device=device)
    return dict(imgs=imgs, ids_keep=ids_keep, ids_restore=ids_restore, x=x, cls=cls, pos=pos, pred=pred, mask=mask)


CALLS = {
    "patch_gather": lambda t: patch_gather(t["imgs"], t["ids_keep"], 8),
    "encoder_input": lambda t: encoder_input(t["x"], t["cls"], t["pos"], t["ids_keep"]),
    "unshuffle": lambda t: unshuffle(torch.cat([t["x"][:, :1], t["x"]], 1), t["cls"], t["ids_restore"], t["pos"]),
    "masked_mse": lambda t: masked_mse(t["pred"], t["imgs"], t["mask"], 8, True),
}
# (op, input changed, how, message)
BAD = [
    ("patch_gather", "ids_keep", lambda v: v.float(), "ids_keep must be an int64 or int32 tensor, got torch.float32"),
    ("patch_gather", "imgs", lambda v: v[0], r"imgs must be \(N, C, H, W\), got shape \(3, 32, 32\)"),
    ("patch_gather", "ids_keep", lambda v: v.to("meta"), "ids_keep is on meta, the other inputs on cpu"),
    ("encoder_input", "ids_keep", lambda v: v.double(), "ids_keep must be an int64 or int32 tensor"),
    ("encoder_input", "x", lambda v: v[0], r"x must be \(N, K, D\), got shape \(4, 16\)"),
    ("unshuffle", "ids_restore", lambda v: v.float(), "ids_restore must be an int64 or int32 tensor"),
    ("unshuffle", "ids_restore", lambda v: v[0], r"ids_restore must be \(N, L\), got shape \(16,\)"),
    ("unshuffle", "pos", lambda v: v.to("meta"), "pos is on meta, the other inputs on cpu"),
    ("masked_mse", "pred", lambda v: v.flatten(1), r"pred must be \(N, L, P\*P\*C\), got shape \(2, 3072\)"),
    ("masked_mse", "mask", lambda v: v.to("meta"), "mask is on meta, the other inputs on cpu"),
]


@pytest.mark.parametrize("op, name, how, message", BAD, ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_are_clear_errors(op, name, how, message):
    t = _inputs("cpu")
    t[name] = how(t[name])
    with pytest.raises(ValueError, match=message):
        CALLS[op](t)


@pytest.mark.parametrize("op", ["patch_gather", "encoder_input", "unshuffle"])
def test_int32_ids_give_what_int64_ids_give(op, device):
    t = _inputs(device)
    want = CALLS[op](t)
    t32 = {k: v.int() if k.startswith("ids") else v for k, v in t.items()}
    assert torch.equal(CALLS[op](t32), want)
