"""The trainer's configuration: one typed dataclass, presets, a JSON config file and the CLI.

Resolution order, later wins: the dataclass defaults (the paper's recipe), the preset, the config
file (``--config run.json``; with ``--run-dir R --resume ...`` and no ``--config``, R's saved
``config.json``), then each ``--field value`` on the command line. Every field is a
flag (``embed_dim`` -> ``--embed-dim``; booleans as ``--flag`` / ``--no-flag``). Bad values raise
:class:`ConfigError`, whose message is one line fit for ``parser.error`` (exit code 2).

Batch sizes follow timm / MAE: ``batch_size`` is per GPU (per process). The optimizer sees the
effective batch ``batch_size x world_size x accum_iter``; by default ``accum_iter`` is derived so
that this equals ``effective_batch`` (4096, the paper's), and ``lr`` defaults to
``blr x effective_batch / 256``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmae.cli import ArgumentParser, add_field_argument, field_type, flag

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTN_BACKENDS = ("auto", "sdpa", "sdpa_pad64", "triton", "xformers", "math")
DATA_BACKENDS = ("auto", "dali", "torch", "synthetic")
# fastmae.model's (without importing torch here) and "auto", which train.py resolves
ACTIVATION_CHECKPOINTING = ("auto", "none", "gelu", "selective", "full")
RESIDUAL_DTYPES = ("float32", "autocast")  # fastmae.model's
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CHOICES = {
    "precision": PRECISIONS,
    "attn_backend": ATTN_BACKENDS,
    "decoder_attn_backend": ("same", *ATTN_BACKENDS),
    "data_backend": DATA_BACKENDS,
    "activation_checkpointing": ACTIVATION_CHECKPOINTING,
    "residual_dtype": RESIDUAL_DTYPES,
    "compile_mode": COMPILE_MODES,
}


class ConfigError(ValueError):
    """A bad configuration value; ``str(err)`` is one line for the CLI."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    """Everything a run needs. Defaults are the MAE paper's pre-training recipe (ViT-B/16 shapes)."""

    # run
    preset: str = _f("demo", "preset applied before the config file and the flags")
    run_dir: str = _f("", "run directory; '' = runs/<preset> (runs/<preset>-2, ... when that one holds a run)")
    resume: str = _f("", "'' = fresh run, 'auto' = latest checkpoint of the run directory, or a checkpoint path")
    init_from: str = _f(
        "",
        "start from these weights (continued pretraining; fresh optimizer and schedule): an official MAE, "
        "EasyCV, Hugging Face ViTMAE (file or folder), safetensors or fastmae checkpoint; the encoder "
        "must match, a decoder of another shape keeps its init; ignored once the run has a checkpoint",
    )
    seed: int = _f(0, "seed of the initialisation, data order, augmentation and masking noise")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = the whole schedule); the schedule is unchanged")

    # model (MaskedAutoencoderViT arguments)
    img_size: int = _f(224, "input side in pixels")
    patch_size: int = _f(16, "patch side in pixels")
    embed_dim: int = _f(768, "encoder width")
    depth: int = _f(12, "encoder blocks")
    num_heads: int = _f(12, "encoder heads")
    decoder_embed_dim: int = _f(512, "decoder width")
    decoder_depth: int = _f(8, "decoder blocks")
    decoder_num_heads: int = _f(16, "decoder heads")
    mlp_ratio: float = _f(4.0, "MLP hidden size over the width")
    norm_pix_loss: bool = _f(True, "normalise each target patch by its mean and std")
    mask_ratio: float = _f(0.75, "fraction of patches removed, in [0, 1)")

    # speed
    device: str = _f("auto", "'auto' (cuda:LOCAL_RANK when CUDA is available, else cpu), 'cpu' or 'cuda'")
    dist_timeout: float = _f(
        30.0,
        "minutes a process waits in a collective for the others under torchrun before the job is aborted "
        "(NCCL's own default is 10: rank 0's checkpoint writes and kNN monitor, and first compiles of "
        "uneven length, are waited for)",
    )
    precision: str = _f(
        "auto",
        "autocast: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (+ GradScaler) or fp32 (full fp32 matmuls: no TF32)",
    )
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA, off for CPU)")
    compile_mode: str = _f(
        "default",
        "torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune or "
        "max-autotune-no-cudagraphs (Triton GEMMs with their epilogues fused where faster; minutes of compile)",
    )
    fused: bool | None = _f(None, "the model's Triton fast path (default: on for CUDA, off for CPU)")
    attn_backend: str = _f(
        "auto",
        "attention: auto (triton for the decoder, head dim 32, on compute capability 9.0 GPUs, where "
        "an H200 measured it faster; else xformers where it runs, else sdpa), sdpa, sdpa_pad64 (head dims under 64 "
        "zero-padded to 64), triton (fastmae's short-sequence kernel), xformers or math "
        "(math = plain fp32-softmax reference)",
    )
    decoder_attn_backend: str = _f("same", "the decoder's attention, when it should differ (same = --attn-backend's)")
    activation_checkpointing: str = _f(
        "auto",
        "what the blocks keep for backward: auto (selective when compiled on CUDA, else none), none, "
        "gelu (recompute the MLP's GELU), selective (recompute norms, GELU, activation casts, adds: no "
        "extra matrix multiply) or full (recompute each block: least memory, ~1/3 more FLOPs); results "
        "do not change",
    )
    residual_dtype: str = _f(
        "float32",
        "the blocks' residual stream: float32 (the reference, under autocast too) or autocast (bf16, "
        "with --precision bf16: fewer bytes for the adds and norms, coarser rounding; changes results)",
    )

    # data
    data_path: str = _f("", "image root (ImageFolder tree, folder of images, or the root of --data-list)")
    data_list: str = _f("", "file list, one 'relative/path [label]' per line")
    data_backend: str = _f("auto", "auto (dali on CUDA when installed, else torch), dali, torch or synthetic")
    num_workers: int = _f(8, "DataLoader workers or DALI threads per process")
    demo_images: int = _f(0, "images generated for the demo when --data-path is '' (demo preset)")

    # optimization
    epochs: int = _f(800, "training epochs")
    warmup_epochs: float = _f(40.0, "linear warm-up epochs, then half-cycle cosine to min_lr")
    batch_size: int = _f(64, "images per GPU (per process) per micro-step")
    effective_batch: int = _f(4096, "images per optimizer step over all GPUs; 0 = batch_size x world (no accumulation)")
    accum_iter: int = _f(0, "micro-steps per optimizer step; 0 = derived from effective_batch")
    blr: float = _f(1.5e-4, "base learning rate: lr = blr x effective batch / 256")
    lr: float | None = _f(None, "absolute learning rate (overrides blr)")
    min_lr: float = _f(0.0, "floor of the cosine schedule")
    weight_decay: float = _f(0.05, "AdamW weight decay (not on norms, biases)")
    betas: tuple[float, float] = _f((0.9, 0.95), "AdamW betas", nargs=2)

    # progress, checkpoints, pictures
    log_every: int = _f(20, "optimizer steps between log lines (the only host syncs of the loop)")
    ckpt_every_steps: int = _f(1000, "optimizer steps between checkpoints (also one at every epoch end)")
    keep_last: int = _f(3, "rolling checkpoints kept")
    keep_every_epochs: int = _f(100, "also keep the epoch-end checkpoint every K epochs forever (0 = none)")
    vis_every_epochs: int = _f(20, "reconstruction grid every N epochs and at the end (0 = only at the end)")
    vis_samples: int = _f(8, "rows of the reconstruction grid")
    progress: bool = _f(True, "tqdm progress bar (rank 0)")

    # kNN monitor: a cheap signal of representation quality during pretraining
    knn_every: int = _f(0, "kNN accuracy of the frozen encoder every N epochs and at the end (0 = off)")
    knn_data_path: str = _f("", "labelled images for the kNN monitor ('' = --data-path, which must have labels)")
    knn_data_list: str = _f("", "file list with labels for the kNN monitor")
    knn_max_images: int = _f(10000, "images used by the kNN monitor (a fifth of them held out as its val split)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


_PAPER = dict(epochs=800, warmup_epochs=40.0, batch_size=64, effective_batch=4096, blr=1.5e-4, img_size=224)


# The paper presets are written out (not read from the factories at import time, which would build
# three large models); a test checks they equal the factories.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(
        # a tiny MAE on 64 px images of the generated demo set: a few minutes on 2 CPU cores
        img_size=64,
        patch_size=8,
        embed_dim=128,
        depth=4,
        num_heads=4,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
        demo_images=2048,
        epochs=8,
        warmup_epochs=1.0,
        batch_size=64,
        effective_batch=0,
        blr=1.2e-2,
        num_workers=1,
        vis_samples=6,
        log_every=8,
        ckpt_every_steps=64,
        keep_last=2,
        keep_every_epochs=0,
        vis_every_epochs=2,
    ),
    "mae_vit_base_patch16": dict(
        _PAPER, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8
    ),
    "mae_vit_large_patch16": dict(
        _PAPER, patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8
    ),
    "mae_vit_huge_patch14": dict(
        _PAPER, patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8
    ),
}

FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _parse_bool_or_none(v: Any) -> bool | None:
    return v if v is None or isinstance(v, bool) else bool(v)


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one flag per :class:`Config` field; unset flags stay out of the namespace."""
    presets = "\n".join(
        textwrap.fill(
            " ".join(f"{k}={v}" for k, v in p.items()),
            width=100,
            initial_indent=f"  {name}: ",
            subsequent_indent="      ",
        )
        for name, p in PRESETS.items()
    )
    parser = ArgumentParser(
        prog="python -m fastmae.train",
        description="MAE pre-training. With no arguments: the demo preset on a generated image set.\n"
        "The defaults shown are the paper's recipe (ViT-B/16 shapes); a preset overrides some of them,\n"
        "a --config file overrides the preset, and flags override both.",
        epilog=f"presets (--preset NAME, default demo) and what they set:\n{presets}\n\n"
        "multi-GPU: torchrun --nproc_per_node 8 -m fastmae.train --preset mae_vit_base_patch16 --data-path ...\n\n"
        "exit codes: 0 done, 2 a bad setting or data, 3 a non-finite loss, 4 out of memory, 5 a collective\n"
        "timed out (torchrun), 130 Ctrl-C, 143 stopped by SIGTERM / SIGUSR1 after a checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE", help="JSON (or YAML, with pyyaml) file of field values")
    for name, f in FIELDS.items():
        default = f.default
        help_ = f"{f.metadata['help']} (default: {'auto' if default is None else default})"
        if name == "preset":
            parser.add_argument(flag(name), choices=list(PRESETS), metavar="NAME", help=help_)
        else:
            add_field_argument(parser, f, help_, CHOICES.get(name))
    return parser


# fields that belong to one invocation, not to the run it continues
PER_INVOCATION = ("max_steps", "resume", "run_dir", "device")  # device: the machine's, not the run's
# paths a run's config.json keeps absolute: a resume from another working directory finds them
PATH_FIELDS = ("data_path", "data_list", "knn_data_path", "knn_data_list", "init_from")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Field values from a JSON (or, with pyyaml installed, YAML) file; a saved ``config.json`` works."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{p}: YAML config files need pyyaml (pip install pyyaml); JSON works without") from None
        values = yaml.safe_load(text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: expected a mapping of field names to values")
    if "resolved" in values:  # a run's saved config.json: its recipe, not where or how far it ran
        values = {k: v for k, v in values.items() if k != "resolved" and k.replace("-", "_") not in PER_INVOCATION}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{p}: unknown field(s) {', '.join(unknown)}")
    return {name: _file_value(p, name, v) for name, v in values.items()}


def _file_value(path: Path, name: str, value: Any) -> Any:
    """A config file's value checked against its field's type, as argparse checks a flag's.

    Ints pass for floats; nothing else converts (``"false"`` is not a bool, ``"2"`` not an int).
    """
    f = FIELDS[name]
    kind = field_type(f)
    nargs = f.metadata.get("nargs")

    def ok(v: Any) -> bool:
        if kind is float:
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        if kind is int:
            return isinstance(v, int) and not isinstance(v, bool)
        return isinstance(v, kind)

    if (value is None or value == "auto") and "None" in str(f.type):  # "auto", as on the command line
        return None
    if nargs:
        if isinstance(value, (list, tuple)) and len(value) == nargs and all(map(ok, value)):
            return tuple(kind(v) for v in value)
        raise ConfigError(f"{path}: {name} must be a list of {nargs} {kind.__name__}s, got {value!r}")
    if not ok(value):
        expected = kind.__name__ + (', null or "auto"' if "None" in str(f.type) else "")
        raise ConfigError(f"{path}: {name} must be {expected}, got {value!r}")
    return kind(value)


def make_config(overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- preset <- ``overrides`` (the preset named in ``overrides`` or ``demo``); not validated."""
    overrides = dict(overrides or {})
    preset = overrides.get("preset", "demo")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    if "betas" in values:
        values["betas"] = tuple(float(b) for b in values["betas"])
    for name in ("compile", "fused"):
        if name in values:
            values[name] = _parse_bool_or_none(values[name])
    return Config(**values)


def parse_config(argv: list[str] | None = None) -> Config:
    """The config from the command line (``argv=None``: ``sys.argv[1:]``); exits 2 with one line on a bad value."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        file_values = read_config_file(args.pop("config")) if "config" in args else {}
        resume = args.get("resume", "")
        run_dir = args.get("run_dir") or (str(Path(resume).parent) if resume not in ("", "auto") else "")
        saved = Path(run_dir) / "config.json"
        if resume and run_dir and saved.is_file():
            # `--run-dir R --resume ...` (or `--resume R/ckpt.pt`) continues R's own run: its saved
            # config (preset, data, recipe) under a --config file and the flags given, as the stop
            # messages' short command promises; what only limited that invocation (--max-steps) is
            # not carried over (read_config_file drops it from a saved config)
            saved_values = read_config_file(saved)
            ran = json.loads(saved.read_text()).get("resolved", {}).get("effective_batch")
            from fastmae.checkpoint import list_checkpoints

            resumes = resume != "auto" or bool(list_checkpoints(run_dir))  # a start that never saved: fresh
            file_values = {**saved_values, **file_values}
            given = "effective_batch" in args or "accum_iter" in args
            if (
                resumes
                and ran
                and not given
                and (file_values.get("effective_batch") == 0 or file_values.get("accum_iter"))
            ):
                # its effective batch was batch x its processes (x a fixed accumulation): kept on another
                # number of them (accumulation makes it up), as a fixed one is; the checkpoint holds that
                # batch's steps. On the same processes this is the accumulation it ran. After the merge:
                # a --config recipe repeated on resume must not name another batch than the run's.
                file_values["effective_batch"], file_values["accum_iter"] = ran, 0
        if "blr" in args and "lr" not in args:
            file_values.pop("lr", None)  # the flag asks for blr's lr; a saved or file lr would override it
        if "effective_batch" in args and "accum_iter" not in args:
            file_values.pop("accum_iter", None)  # the flag asks for a batch; a file's accumulation would override it
        if "preset" in args:
            file_values.pop("preset", None)
        cfg = make_config({**file_values, **args})
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        for name in PATH_FIELDS:
            if getattr(cfg, name):
                setattr(cfg, name, os.path.abspath(getattr(cfg, name)))
    except ConfigError as e:
        parser.error(str(e))
    return cfg


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` on values that cannot run (data paths are checked by the trainer)."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r} (choose from {', '.join(PRESETS)})")
    for name, choices in CHOICES.items():  # the CLI checks these itself; a config file does not
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    if cfg.patch_size < 1 or cfg.img_size < cfg.patch_size:
        raise ConfigError(f"need 1 <= patch size <= image size, got patch {cfg.patch_size} and image {cfg.img_size}")
    if cfg.img_size % cfg.patch_size:
        raise ConfigError(f"image size {cfg.img_size} is not divisible by the patch size {cfg.patch_size}")
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ConfigError(f"mask ratio must be in [0, 1), got {cfg.mask_ratio}")
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    if int(num_patches * (1 - cfg.mask_ratio)) < 1:
        raise ConfigError(f"mask ratio {cfg.mask_ratio} keeps no patch of a {cfg.img_size} px image")
    if int(num_patches * (1 - cfg.mask_ratio)) == num_patches:  # the loss averages over the removed
        raise ConfigError(
            f"mask ratio {cfg.mask_ratio} removes no patch of a {cfg.img_size} px image ({num_patches} patches): "
            "the loss is over the removed ones (MAE's is 0.75)"
        )
    for name, dim, heads in (
        ("", cfg.embed_dim, cfg.num_heads),
        ("decoder_", cfg.decoder_embed_dim, cfg.decoder_num_heads),
    ):
        if heads < 1 or dim % heads:
            raise ConfigError(f"{name}embed_dim {dim} is not divisible by {name}num_heads {heads}")
    for name in (
        "embed_dim", "depth", "decoder_embed_dim", "batch_size", "epochs", "log_every", "ckpt_every_steps",
        "keep_last",
    ):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in (
        "decoder_depth", "seed", "effective_batch", "accum_iter", "max_steps", "num_workers", "demo_images", "vis_samples",
        "knn_every", "knn_max_images", "keep_every_epochs", "vis_every_epochs", "blr", "min_lr", "weight_decay",
    ):  # fmt: skip
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for f in dataclasses.fields(cfg):  # nan passes every comparison below, inf most of them
        values = getattr(cfg, f.name) if isinstance(getattr(cfg, f.name), (tuple, list)) else [getattr(cfg, f.name)]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{f.name} must be a finite number, got {getattr(cfg, f.name)!r}")
    if cfg.mlp_ratio <= 0:
        raise ConfigError(f"mlp_ratio must be > 0, got {cfg.mlp_ratio}")
    if cfg.dist_timeout <= 0:
        raise ConfigError(f"dist_timeout must be > 0 minutes, got {cfg.dist_timeout}")
    if cfg.lr is not None and cfg.lr < 0:
        raise ConfigError(f"lr must be >= 0, got {cfg.lr}")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {' '.join(map(str, cfg.betas))}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise ConfigError(f"warmup_epochs must be in [0, epochs={cfg.epochs}], got {cfg.warmup_epochs}")
    accum_iter(cfg, world_size)
    if cfg.resume not in ("", "auto") and os.path.isdir(cfg.resume):
        raise ConfigError(
            f"--resume {cfg.resume} is a folder: pass --run-dir {cfg.resume} --resume auto, or a checkpoint file"
        )
    if cfg.resume not in ("", "auto") and not os.path.isfile(cfg.resume):
        raise ConfigError(f"resume checkpoint {cfg.resume} does not exist (use --resume auto for the latest)")
    if cfg.run_dir and os.path.exists(cfg.run_dir) and not os.path.isdir(cfg.run_dir):
        raise ConfigError(f"--run-dir {cfg.run_dir} is a file, not a folder")
    if cfg.data_list and not cfg.data_path:
        raise ConfigError("--data-list needs --data-path, the root its paths are relative to")
    # --init-from is read only by a run with no checkpoint yet: a resumed one does not need the file
    for name in ("data_path", "data_list", "knn_data_path", "knn_data_list", *(() if cfg.resume else ("init_from",))):
        path = getattr(cfg, name)
        if path and not os.path.exists(path):
            raise ConfigError(f"--{name.replace('_', '-')} {path} does not exist")
        if path and name.endswith("_list") and os.path.isdir(path):
            raise ConfigError(f"--{name.replace('_', '-')} {path} is a folder, not a file list")
    if not cfg.data_path and cfg.data_backend != "synthetic" and cfg.preset != "demo":
        raise ConfigError(f"preset {cfg.preset} needs --data-path (only the demo preset generates its own images)")


def accum_iter(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step: ``cfg.accum_iter`` if set, else effective_batch / (batch_size x world)."""
    per_step = cfg.batch_size * world_size
    if cfg.accum_iter:
        return cfg.accum_iter
    if cfg.effective_batch == 0:
        return 1
    if cfg.effective_batch % per_step:
        fits = [b for b in range(cfg.batch_size, 0, -1) if cfg.effective_batch % (b * world_size) == 0]
        hint = f" (--batch-size {fits[0]} keeps it)" if fits else ""
        raise ConfigError(
            f"effective batch {cfg.effective_batch} is not divisible by batch_size {cfg.batch_size} x "
            f"{world_size} process(es) = {per_step}; change --batch-size{hint}, --effective-batch or --accum-iter"
        )
    return cfg.effective_batch // per_step


def effective_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all processes."""
    return cfg.batch_size * world_size * accum_iter(cfg, world_size)


def learning_rate(cfg: Config, world_size: int) -> float:
    """Peak learning rate: ``cfg.lr``, else the paper's linear scaling ``blr x effective batch / 256``."""
    return cfg.lr if cfg.lr is not None else cfg.blr * effective_batch(cfg, world_size) / 256
