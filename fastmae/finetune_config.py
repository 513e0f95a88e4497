"""``python -m fastmae.finetune``'s settings: :class:`FinetuneConfig`, the MAE paper's recipe per mode
and model size (:func:`recipe`), the command line and its checks, and a run's saved config (what
``--resume auto`` continues from). The run itself is :mod:`fastmae.finetune`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fastmae.attention import BACKENDS
from fastmae.cli import dataclass_parser, to_dict
from fastmae.config import ConfigError
from fastmae.convert import hf_weights_file
from fastmae.data.randaugment import RandAugment

DESCRIPTION = "Using the pretrained encoder: ``python -m fastmae.finetune --mode full|partial|linear|knn|eval``."
PROG = "python -m fastmae.finetune"
MODES = ("full", "partial", "linear", "knn", "eval")
# name: (patch_size, embed_dim, depth, num_heads)
ARCHS = {
    "vit_base_patch16": (16, 768, 12, 12),
    "vit_large_patch16": (16, 1024, 24, 16),
    "vit_huge_patch14": (14, 1280, 32, 16),
}


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class FinetuneConfig:
    """A fine-tuning / probing run. ``None`` means: the recipe's value for the mode and model size."""

    mode: str = _f("full", "full | partial | linear | knn | eval (score --pretrained's classifier, its head too, on "
                   "--val-path)", choices=MODES)  # fmt: skip
    pretrained: str = _f(
        "",
        "checkpoint to start from (fastmae run, official MAE, EasyCV, .safetensors, a Hugging Face folder); '' = random init",
    )
    init: str = _f("pretrained", "pretrained, or random: --pretrained's architecture at random init (the baseline)",
                   choices=("pretrained", "random"))  # fmt: skip
    model: str = _f("auto", "auto (from a fastmae checkpoint) or " + " | ".join(ARCHS))
    img_size: int | None = _f(None, "input side (auto: the checkpoint's, else 224)")
    num_heads: int | None = _f(None, "encoder heads, for checkpoints that do not say (auto: by width)")
    train_path: str = _f("", "labelled training images: ImageFolder root, or the root of --train-list")
    train_list: str = _f("", "file list with labels, 'relative/path label' per line")
    val_path: str = _f("", "validation images (default: a --val-fraction split of the training source)")
    val_list: str = _f("", "validation file list")
    val_fraction: float = _f(0.2, "per-class share held out for validation when --val-path is not given")
    num_classes: int = _f(0, "classes (0 = from the labels)")
    run_dir: str = _f("", "run directory (default runs/finetune-<mode>)")
    resume: str = _f("", "'' = fresh run, 'auto' = continue the run directory's latest checkpoint (its config.json "
                     "gives what the flags do not)")  # fmt: skip
    seed: int = _f(0, "seed of the head init, data order and augmentation")

    epochs: int | None = _f(None, "epochs (recipe: full 100 (50 for L/H), partial 100, linear 90 (50 for L/H))")
    warmup_epochs: float | None = _f(None, "linear warm-up epochs, then half-cycle cosine (recipe: 5, linear 10)")
    batch_size: int = _f(32, "images per GPU (per process)")
    blr: float | None = _f(None, "base lr: lr = blr x batch x world / 256 (recipe: 5e-4 (1e-3 for L/H), linear 0.1)")
    lr: float | None = _f(None, "absolute learning rate (overrides blr)")
    min_lr: float = _f(1e-6, "floor of the cosine schedule")
    layer_decay: float | None = _f(None, "layer-wise lr decay (recipe: 0.65 for ViT-B, 0.75 for L/H)")
    weight_decay: float | None = _f(None, "weight decay (recipe: 0.05, linear 0)")
    drop_path: float | None = _f(None, "stochastic depth (recipe: 0.1 B, 0.2 L, 0.3 H; linear 0)")
    smoothing: float | None = _f(None, "label smoothing (recipe: 0.1, linear 0)")
    mixup: float | None = _f(None, "mixup's Beta alpha, 0 = off (recipe: 0.8, linear 0)")
    cutmix: float | None = _f(None, "CutMix's Beta alpha, 0 = off (recipe: 1.0, linear 0)")
    mixup_prob: float = _f(1.0, "probability that a batch is mixed (mixup or CutMix)")
    mixup_switch_prob: float = _f(0.5, "probability of CutMix instead of mixup when both are on")
    reprob: float | None = _f(None, "random erasing, per image (recipe: 0.25, linear 0)")
    aa: str | None = _f(None, "RandAugment policy, timm's string ('' = off; recipe: rand-m9-mstd0.5-inc1, linear ''; "
                        "the torch loader)")  # fmt: skip
    global_pool: bool | None = _f(None, "average-pool + fc_norm (recipe: on, linear off = cls token)")
    optimizer: str = _f("auto", "auto (recipe: LARS for linear, AdamW otherwise), lars, adamw or sgd",
                        choices=("auto", "lars", "adamw", "sgd"))  # fmt: skip
    trainable_blocks: int = _f(4, "partial mode: the last K blocks train")
    min_scale: float = _f(
        0.08,
        "RandomResizedCrop's smallest crop, a share of the image's area (the official "
        "fine-tuning and linear probe: 0.08, torchvision's default; pretraining: 0.2)",
    )
    knn_k: int = _f(20, "kNN neighbours")
    knn_t: float = _f(0.07, "kNN temperature")

    device: str = _f("auto", "auto, cpu or cuda")
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")
    compile: bool | None = _f(None, "torch.compile (default: on for CUDA)")
    attn_backend: str = _f("auto", "auto, sdpa, sdpa_pad64, triton (fastmae's kernel; CUDA), xformers or math")
    data_backend: str = _f("torch", "training loader: torch or dali", choices=("torch", "dali"))
    num_workers: int = _f(4, "loader workers per process")
    log_every: int = _f(20, "steps between log lines")
    max_steps: int = _f(0, "stop after this many steps (0 = all epochs)")
    progress: bool = _f(True, "tqdm progress bar")


def recipe(cfg: FinetuneConfig, depth: int) -> FinetuneConfig:
    """``cfg`` with every ``None`` replaced by the MAE recipe's value for its mode and model depth."""
    linear = cfg.mode == "linear"
    large = depth > 12
    defaults = dict(
        # FINETUNE.md: ViT-L/H fine-tune for 50 epochs, and "it is sufficient to train 50 epochs" to probe them;
        # partial fine-tuning's epochs vary with the blocks tuned (the paper tried 50, 100 and 200)
        epochs=(50 if large else 90) if linear else (50 if large and cfg.mode == "full" else 100),
        warmup_epochs=10.0 if linear else 5.0,
        blr=0.1 if linear else (1e-3 if large else 5e-4),
        layer_decay=1.0 if linear else (0.75 if large else 0.65),
        weight_decay=0.0 if linear else 0.05,
        drop_path=0.0 if linear else {12: 0.1, 24: 0.2, 32: 0.3}.get(depth, 0.1),
        smoothing=0.0 if linear else 0.1,
        mixup=0.0 if linear else 0.8,
        cutmix=0.0 if linear else 1.0,
        reprob=0.0 if linear else 0.25,
        aa="" if linear else "rand-m9-mstd0.5-inc1",
        global_pool=not linear,
    )
    values = to_dict(cfg)
    if cfg.mode == "eval":  # the classifier's weights say how it pools
        del defaults["global_pool"]
    for k, v in defaults.items():
        if values[k] is None:
            values[k] = v
    return FinetuneConfig(**values)


def optimizer_name(mode: str, optimizer: str) -> str:
    """``--optimizer`` with ``auto`` resolved: the recipe's LARS for the linear probe, else AdamW."""
    return optimizer if optimizer != "auto" else ("lars" if mode == "linear" else "adamw")


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    parser = dataclass_parser(
        FinetuneConfig,
        PROG,
        description=DESCRIPTION,
        epilog="example: python -m fastmae.finetune --mode linear --pretrained runs/demo/ckpt-step000000256.pt "
        "--train-path ~/.cache/fastmae/demo-2048 --optimizer adamw --blr 1e-2 (the recipe's LARS is for batch 16384)",
    )
    values = vars(parser.parse_args(argv))
    try:
        if values.get("resume") == "auto":  # the run's saved config under the flags given, as pretraining's
            saved = saved_config(Path(values.get("run_dir") or f"runs/finetune-{values.get('mode', 'full')}"))
            if "blr" in values and "lr" not in values:  # the flag asks for blr's lr; a saved lr would override it
                saved.pop("lr", None)
            values = {**saved, **values}
        for name in PATH_FIELDS:  # a resume from another working directory finds them
            if values.get(name):
                values[name] = os.path.abspath(values[name])
        cfg = FinetuneConfig(**values)
        validate(cfg)
    except ConfigError as e:
        parser.error(str(e))
    return cfg


PATH_FIELDS = ("pretrained", "train_path", "train_list", "val_path", "val_list")


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The field values of ``run_dir``'s ``config.json`` (none without one), less what belonged to the
    invocation that wrote it (its run directory, resume, step limit, device)."""
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"run_dir", "resume", "max_steps", "device"}
    values = {k: v for k, v in saved.items() if k in fields}
    values.setdefault("min_scale", 0.2)  # a run from before --min-scale cropped at pretraining's scale
    for name in ("mixup", "cutmix", "reprob"):  # a run from before them trained without
        values.setdefault(name, 0.0)
    values.setdefault("aa", "")
    return values


def validate(cfg: FinetuneConfig) -> None:
    if cfg.mode == "eval":
        if not cfg.pretrained or cfg.init != "pretrained":
            raise ConfigError("--mode eval scores a trained classifier: name it with --pretrained")
        if not cfg.val_path:
            raise ConfigError("--mode eval needs --val-path (a labelled ImageFolder tree, or the root of --val-list)")
        if cfg.resume:
            raise ConfigError("--mode eval trains nothing, so there is nothing to --resume")
    elif not cfg.train_path:
        raise ConfigError("--train-path is required (a labelled ImageFolder tree, or the root of --train-list)")
    for name in ("train_path", "train_list", "val_path", "val_list", "pretrained"):
        path = getattr(cfg, name)
        if path and not Path(path).exists():
            raise ConfigError(f"--{name.replace('_', '-')} {path} does not exist")
    if cfg.model not in ("auto", *ARCHS):
        raise ConfigError(f"unknown model {cfg.model!r} (auto, {', '.join(ARCHS)})")
    if cfg.model == "auto" and not cfg.pretrained:
        raise ConfigError("--model auto needs a --pretrained fastmae checkpoint; name a model for a random init")
    if cfg.pretrained and Path(cfg.pretrained).is_dir():
        try:
            hf_weights_file(cfg.pretrained)
        except ValueError as e:
            raise ConfigError(f"--pretrained {e}") from None
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    for name in ("img_size", "num_heads", "epochs", "knn_k", "log_every"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for f in fields(cfg):  # nan passes every comparison below
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(cfg, f.name)}")
    for name in ("max_steps", "num_classes", "trainable_blocks", "num_workers", "seed", "warmup_epochs", "blr", "lr",
                 "min_lr", "layer_decay", "weight_decay"):  # fmt: skip
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.aa:
        try:
            RandAugment.parse(cfg.aa)
        except ValueError as e:
            raise ConfigError(f"--aa: {e}") from None
    for name in ("mixup", "cutmix"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ConfigError(f"--{name} must be >= 0 (0 = off), got {getattr(cfg, name)}")
    for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
        if getattr(cfg, name) is not None and not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("drop_path", "smoothing"):
        if getattr(cfg, name) is not None and not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.resume not in ("", "auto"):  # a run directory keeps one checkpoint: its latest is the run
        where = Path(cfg.resume).parent if Path(cfg.resume).is_file() else "<the run's folder>"
        raise ConfigError(f"--resume takes '' or 'auto', got {cfg.resume!r}: continue a run with --run-dir {where} "
                          "--resume auto")  # fmt: skip
    if not 0 < cfg.min_scale <= 1:
        raise ConfigError(f"--min-scale must be in (0, 1], got {cfg.min_scale}")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.knn_t <= 0:
        raise ConfigError(f"--knn-t must be > 0, got {cfg.knn_t}")
    for name, choices in (("precision", ("auto", "bf16", "fp16", "fp32")), ("attn_backend", BACKENDS)):
        if getattr(cfg, name) not in choices:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}"
            )
