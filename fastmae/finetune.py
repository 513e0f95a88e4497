"""Using the pretrained encoder: ``python -m fastmae.finetune --mode full|partial|linear|knn``.

The three evaluations of the MAE paper, plus kNN on frozen features:

    full     fine-tune everything: AdamW, layer-wise lr decay (0.65 for ViT-B, 0.75 for L/H),
             drop path, label smoothing 0.1, global-average-pool + fc_norm head (``models_vit``).
    partial  the same recipe with only the last ``--trainable-blocks`` blocks, the norm and the head
             trained.
    linear   linear probing: cls token, ``BatchNorm1d(affine=False, eps=1e-6)`` + Linear head, LARS,
             no weight decay, the encoder frozen (``main_linprobe``).
    knn      no training: cosine kNN (k = 20, T = 0.07, as DINO) on frozen features: the pretrained
             final norm of the mean patch token, the features of the trainer's ``--knn-every``.
    eval     no training: top-1 / top-5 of a fine-tuned classifier, its head too, on ``--val-path``
             (``main_finetune.py --eval``): a fastmae run's checkpoint, an official
             ``mae_finetuned_vit_*.pth`` or a probe's. A fastmae checkpoint names its classes and
             the validation folders are matched by name; otherwise the labels are the validation
             source's (an ImageFolder's sorted folders: ImageNet's usual order).

``--pretrained`` takes a fastmae run checkpoint (its architecture comes with it), an official MAE
checkpoint, an EasyCV (``encoder.``) or DDP (``module.``) one, a Hugging Face ViTMAE or timm
``.safetensors`` file, or a fine-tuned classifier (fastmae's or timm-named): its encoder is the init,
its head is dropped (kept by ``--mode eval``); a global-pool one's trained ``fc_norm`` is kept, so it cannot start a cls-token
model (``--mode linear``). Empty means a random init (the baseline). Head counts are not in the
weights: without a fastmae config they are guessed by width (``--num-heads`` to say). A checkpoint
of another patch grid (``--img-size 384`` from a 224 one) has its position embedding resampled
(bicubic, as the official code). Data:
labelled ImageFolder trees or file lists with labels; ``--val-fraction`` splits one source per class
when there is no ``--val-path``.

It runs on the trainer's machinery: the torchrun process group, bf16 autocast (fp16 with loss
scaling) and ``torch.compile`` on CUDA, DDP, the loaders, the lr schedule, atomic checkpoints and the
metrics log. Training augmentation is the pretraining loader's random-resized crop + flip, at the
official fine-tuning's and probe's scale (0.08, 1) (``--min-scale``); full and partial fine-tuning
add the official recipe's RandAugment ``rand-m9-mstd0.5-inc1`` (:mod:`fastmae.data.randaugment`, in
the torch loader), mixup 0.8 / CutMix 1.0 (soft targets) and random erasing 0.25 on the batch
(:mod:`fastmae.mixup`), each drawing as timm does. A run continues (``--resume auto``) at
the effective batch (batch x processes) it started with; on another number of processes, each takes
its share of it (:func:`~fastmae.finetune_resume.batch_for_processes`). Under torchrun, kNN votes and scores over
every rank's share.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from fastmae import checkpoint as ckpt
from fastmae import distributed, loop
from fastmae.attention import AttentionBackendError
from fastmae.cli import to_dict
from fastmae.config import ConfigError
from fastmae.data import BadFileReport, DataError, EpochPlan, Source, build_loader, open_source
from fastmae.data.eval import EvalLoader, split_source, to_training_labels
from fastmae.data.randaugment import RandAugment
from fastmae.finetune_config import (  # noqa: F401 (re-exported: fastmae.finetune is the CLI's module)
    ARCHS,
    MODES,
    PATH_FIELDS,
    PROG,
    FinetuneConfig,
    optimizer_name,
    parse_args,
    recipe,
    saved_config,
    validate,
)
from fastmae.finetune_model import (  # noqa: F401 (re-exported, as above)
    architecture,
    build_classifier,
    classifier_head,
    fit_pos_embed,
    load_pretrained,
    pretrained_weights,
)
from fastmae.finetune_resume import batch_for_processes, check_resumable, check_same_schedule, saved_mode
from fastmae.knn import knn_result
from fastmae.lars import LARS
from fastmae.log import MetricsLog, record_line, run_environment
from fastmae.mixup import Mixup, random_erase, soft_target_cross_entropy, step_generators
from fastmae.rundir import hold_run_dir, in_use, release_run_dirs
from fastmae.train import LOCAL_SETTINGS, lr_at, resolve_precision
from fastmae.vit import VisionTransformer, param_groups_lrd

EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, after a checkpoint, as the trainer


class Stopped(Exception):
    """SIGTERM / SIGUSR1 stopped the run at a log step, after a checkpoint."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"stopped by a signal at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


# ------------------------------------------------------------------------------------------- data


def open_splits(cfg: FinetuneConfig) -> tuple[Source, Source, int]:
    """(training source, validation source, number of classes), the validation labels in the
    training classes: the classes are the training set's, the head's outputs and kNN's votes."""
    train = open_source(cfg.train_path, cfg.train_list or None)
    if cfg.val_path:
        val = open_source(cfg.val_path, cfg.val_list or None)
    else:
        train, val = split_source(train, cfg.val_fraction, cfg.seed)
    for name, src in (("training", train), ("validation", val)):
        if min(y for _, y in src.samples) < 0:
            raise DataError(f"the {name} source has unlabelled images: use an ImageFolder tree or a list with labels")
    labels = len(train.classes) if train.classes is not None else 1 + max(y for _, y in train.samples)
    if cfg.num_classes and cfg.num_classes < labels:
        raise ConfigError(
            f"--num-classes {cfg.num_classes} but the labels go up to {labels - 1}; leave it 0 (from the labels)"
        )
    num_classes = cfg.num_classes or labels
    return train, to_training_labels(val, train, num_classes), num_classes


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: EvalLoader, autocast: Any, num_classes: int) -> dict[str, float]:
    """Top-1 / top-5 (%) over the whole validation split, summed across ranks."""
    model.eval()
    device = loader.device
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for images, labels in loader:
        with autocast:
            logits = model(images)
        top = logits.float().topk(min(5, num_classes), dim=1).indices
        counts[0] += (top[:, 0] == labels).sum()
        counts[1] += (top == labels[:, None]).any(dim=1).sum()
        counts[2] += len(labels)
    distributed.all_reduce_sum(counts)
    model.train()
    hits1, hits5, n = counts.tolist()
    return {"top1": 100.0 * hits1 / max(n, 1), "top5": 100.0 * hits5 / max(n, 1), "n": int(n)}


def score_classifier(
    cfg: FinetuneConfig, checkpoint: Any, arch: dict[str, Any], env: distributed.DistEnv, run_dir: Path
) -> dict[str, Any]:
    """``--mode eval``: top-1 / top-5 of ``--pretrained``'s classifier, head and all, on the validation
    source, in ``run_dir/results.json``. The labels are matched to the classes a fastmae checkpoint
    names; without names they are the validation source's own (sorted ImageFolder classes)."""
    main = env.is_main
    sd = pretrained_weights(cfg, checkpoint)
    try:
        num_classes, global_pool, linear_probe = classifier_head(sd)
    except ConfigError as e:
        raise ConfigError(f"--pretrained {cfg.pretrained}: {e}") from None
    if cfg.global_pool is not None and cfg.global_pool != global_pool:
        raise ConfigError(f"--pretrained {cfg.pretrained} is a {'global-pool' if global_pool else 'cls-token'} "
                          f"classifier (fc_norm {'present' if global_pool else 'absent'}): drop --"
                          f"{'no-' if not cfg.global_pool else ''}global-pool")  # fmt: skip
    val = open_source(cfg.val_path, cfg.val_list or None)
    if min(y for _, y in val.samples) < 0:
        raise DataError("the validation source has unlabelled images: use an ImageFolder tree or a list with labels")
    classes = checkpoint.get("classes") if isinstance(checkpoint, dict) else None
    if classes is not None and val.classes is not None:  # a fastmae run's: its training classes, by name
        named = Source(root=cfg.pretrained, samples=[], kind="imagefolder", classes=list(classes))
        val = to_training_labels(val, named, num_classes)
    elif val.classes is not None and len(val.classes) != num_classes:
        # without names the labels are the folders' own sorted indices: a subset of the classes is
        # numbered afresh and every image scored against another class (0% on a 2-of-4 tree)
        raise DataError(
            f"{val.root} has {len(val.classes)} class folders where the classifier has {num_classes} outputs, and "
            f"--pretrained names no classes: its labels would be the folders' own indices. Give all {num_classes} "
            "class folders, or a --val-list with the classifier's labels"
        )
    elif (top := max(y for _, y in val.samples)) >= num_classes:
        raise DataError(f"the validation labels go up to {top} but the classifier has {num_classes} outputs")
    vit = VisionTransformer(
        **arch, num_classes=num_classes, global_pool=global_pool, linear_probe=linear_probe,
        attn_backend=cfg.attn_backend,
    )  # fmt: skip
    sd = fit_pos_embed(sd, arch["img_size"] // arch["patch_size"], main, f"--pretrained {cfg.pretrained}")
    try:
        missing, unexpected = vit.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape mismatch
        detail = "; ".join(line.strip() for line in str(e).strip().splitlines()[1:3])
        raise ConfigError(f"--pretrained {cfg.pretrained} does not load as a classifier: {detail}") from None
    if missing or unexpected:
        raise ConfigError(f"--pretrained {cfg.pretrained} does not load as a classifier: missing "
                          f"{missing[:4] or 'none'}, unexpected {unexpected[:4] or 'none'}")  # fmt: skip
    device = env.device
    model = vit.to(device).eval()
    precision, dtype = resolve_precision(cfg, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    loader = EvalLoader(
        val, cfg.batch_size, arch["img_size"], rank=env.rank, world_size=env.world_size, device=device,
        num_workers=cfg.num_workers, report_dir=run_dir if main else None,
    )  # fmt: skip
    if main:
        ckpt.atomic_write_text(
            run_dir / "config.json",
            json.dumps({**to_dict(cfg), "architecture": arch, "environment": run_environment(device)}, indent=2) + "\n",
        )
        print(f"eval: {cfg.pretrained}, {arch['embed_dim']}-d x {arch['depth']} blocks, {num_classes} classes "
              f"({'global pool' if global_pool else 'cls token'}{', probe head' if linear_probe else ''}), "
              f"{len(val)} val images at {arch['img_size']} px, {env.world_size} process(es) on {device}, "
              f"{precision}; run dir {run_dir}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    compiled = cfg.compile if cfg.compile is not None else device.type == "cuda"  # as training's
    metrics = evaluate(torch.compile(model) if compiled else model, loader, autocast, num_classes)
    result = {"mode": "eval", "top1": metrics["top1"], "top5": metrics["top5"], "n_val": metrics["n"],
              "minutes": (time.perf_counter() - t0) / 60}  # fmt: skip
    if main:
        write_results(run_dir, result)
        print(f"eval: val top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}% over {result['n_val']} images; "
              f"run dir {run_dir}", flush=True)  # fmt: skip
    return result


def write_results(run_dir: Path, result: dict[str, Any]) -> None:
    """A finished run's ``results.json`` (every mode's, rank 0's)."""
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")


def lars_reach(cfg: FinetuneConfig, peak_lr: float, total: int, steps_per_epoch: int) -> float:
    """About how far LARS can move a weight matrix over the run, in units of its norm: a step moves
    it by lr x trust coefficient (0.001) x its norm, which momentum 0.9 adds up to 10x that (the
    norm itself held fixed). The recipe (batch 16384, lr 6.4, ~7000 steps) reaches ~200; batch 32 on
    a few thousand images (lr 0.0125) ~0.3, and a user's probe learned nothing in 90 epochs. Raising
    the lr instead moves the biases and norms, which LARS leaves unscaled, as far: they diverge."""
    total_lr = sum(lr_at(step / steps_per_epoch, peak_lr, cfg) for step in range(total))
    return total_lr * 0.001 / (1 - 0.9)


def build_optimizer(
    cfg: FinetuneConfig, model: VisionTransformer, lr: float, device: torch.device
) -> torch.optim.Optimizer:
    """The recipe's optimizer: LARS for the linear probe, AdamW with layer-decay groups otherwise.

    Every group carries an ``lr_scale`` (1 without layer decay) that the schedule multiplies in.
    """
    name = optimizer_name(cfg.mode, cfg.optimizer)
    groups = param_groups_lrd(model, cfg.weight_decay, cfg.layer_decay)
    for g in groups:
        g.pop("names")
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


# -------------------------------------------------------------------------------------------- run


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run ``cfg``; returns the final metrics (also in ``run_dir/results.json``)."""
    env = distributed.init_distributed(cfg.device)
    # the paths may differ (a node-local copy); the data's sameness is not checked here, unlike pretraining's
    local = (*LOCAL_SETTINGS, *PATH_FIELDS, "attn_backend")
    distributed.start_together({k: v for k, v in to_dict(cfg).items() if k not in local})
    device, main = env.device, env.is_main
    checkpoint = load_pretrained(cfg) if cfg.pretrained else None
    arch = architecture(cfg, checkpoint)
    cfg = recipe(cfg, arch["depth"])
    run_dir = Path(cfg.run_dir or f"runs/finetune-{cfg.mode}")
    if cfg.mode not in ("knn", "eval") and cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs:g} is longer than --epochs {cfg.epochs} (the recipe's "
                          f"warm-up for {cfg.mode} is {recipe(FinetuneConfig(mode=cfg.mode), arch['depth']).warmup_epochs:g})")  # fmt: skip
    mode = saved_mode(run_dir)
    if cfg.resume != "auto" and ((run_dir / "results.json").is_file() or ckpt.list_checkpoints(run_dir)):
        raise ConfigError(
            f"{run_dir} already holds a run: pass another --run-dir"
            + (
                ", or --resume auto to continue it"
                if cfg.mode not in ("knn", "eval") and mode in (None, cfg.mode)
                else ""
            )
        )
    # rank 0 holds the run directory for the run (as pretraining does): a second fine-tune started
    # there would overwrite this one's checkpoint, metrics and results
    holder = distributed.broadcast_object(hold_run_dir(run_dir) if main else None)
    if holder is not None:
        raise in_use(run_dir, holder)
    if cfg.resume == "auto" and mode not in (None, cfg.mode):  # continuing it would overwrite its results
        raise ConfigError(
            f"{run_dir} holds a --mode {mode} run: --resume auto continues it only with --mode {mode}; "
            f"pass another --run-dir for --mode {cfg.mode}"
        )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not ckpt.list_checkpoints(run_dir):  # fresh: a report a killed run left is not this one's
            BadFileReport.discard(run_dir)
    if cfg.mode == "eval":
        return score_classifier(cfg, checkpoint, arch, env, run_dir)
    train_src, val_src, num_classes = open_splits(cfg)
    # read and checked before anything is built or written: a checkpoint of another run is one line
    # rank 0 picks the checkpoint and every rank loads that one, as in pretraining
    resumed = ckpt.pick_latest(run_dir, map_location=device) if cfg.resume == "auto" else None
    if resumed is not None and resumed[1] is None:
        try:
            resumed = resumed[0], ckpt.load_checkpoint(resumed[0], map_location=device)
        except Exception as e:  # damaged as this node sees it
            first = (str(e).strip().splitlines() or [""])[0]
            error = ConfigError(f"cannot load the checkpoint {resumed[0]}: {type(e).__name__}: {first}")
            raise distributed.rank_local(error) from None
    if resumed is not None and cfg.mode != "knn":
        cfg = batch_for_processes(cfg, resumed[1], env.world_size, main)
    # every refusal comes before config.json is written: a refused resume leaves the run as it was
    # (the next --resume auto reads its flags from that file)
    eff_batch = cfg.batch_size * env.world_size
    peak_lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    if cfg.mode != "knn" and cfg.aa and cfg.data_backend != "torch":
        raise ConfigError(f"RandAugment (--aa {cfg.aa}) runs in the torch loader: --data-backend torch, or --aa '' "
                          "to train without it")  # fmt: skip
    if cfg.mode != "knn" and (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"mixup / CutMix mix a batch with its reverse: --batch-size must be even, got "
                          f"{cfg.batch_size} (or --mixup 0 --cutmix 0)")  # fmt: skip
    if cfg.mode != "knn" and cfg.min_lr > peak_lr:  # the cosine would climb from the peak to the floor
        raise ConfigError(f"--min-lr {cfg.min_lr:g} is above the peak lr {peak_lr:g} (blr x effective batch / 256, "
                          "or --lr); lower --min-lr")  # fmt: skip
    if resumed is not None:
        check_resumable(cfg, arch, num_classes, *resumed)
        if cfg.mode != "knn":
            plan = EpochPlan(len(train_src), cfg.batch_size, cfg.seed, env.rank, env.world_size)
            check_same_schedule(*resumed, plan.global_batch, plan.steps_per_epoch, cfg.batch_size, env.world_size)
    weights = checkpoint if cfg.init == "pretrained" else None
    model = build_classifier(cfg, arch, num_classes, weights, verbose=main).to(device)
    precision, dtype = resolve_precision(cfg, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    report_dir = run_dir if main else None
    val_loader = EvalLoader(
        val_src, cfg.batch_size, arch["img_size"], rank=env.rank, world_size=env.world_size, device=device,
        num_workers=cfg.num_workers, report_dir=report_dir,
    )  # fmt: skip

    def write_config() -> None:
        if main:
            saved = {**to_dict(cfg), "architecture": arch, "environment": run_environment(device)}
            ckpt.atomic_write_text(run_dir / "config.json", json.dumps(saved, indent=2) + "\n")

    if main:
        print(
            f"{cfg.mode}: {'pretrained ' + cfg.pretrained if weights is not None else 'random init'}, "
            f"{arch['embed_dim']}-d x {arch['depth']} blocks, {num_classes} classes, "
            f"{len(train_src)} train / {len(val_src)} val images, {env.world_size} process(es) on {device}, "
            f"{precision}; run dir {run_dir}",
            flush=True,
        )

    if cfg.mode == "knn":
        write_config()
        train_eval = EvalLoader(
            train_src, cfg.batch_size, arch["img_size"], rank=env.rank, world_size=env.world_size, device=device,
            num_workers=cfg.num_workers, report_dir=report_dir,
        )  # fmt: skip
        model.eval()
        encode = lambda x: model.forward_features(x)  # noqa: E731
        with torch.no_grad(), autocast:
            scores = knn_result(encode, train_eval, val_loader, num_classes, cfg.knn_k, cfg.knn_t)
        result = {"mode": "knn", "k": cfg.knn_k, **scores, "n_val": len(val_src)}
        if main:
            write_results(run_dir, result)
            print(f"kNN (k={cfg.knn_k}): top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%", flush=True)
        return result

    loader = build_loader(
        cfg.data_backend, train_src, batch_size=cfg.batch_size, image_size=arch["img_size"], seed=cfg.seed,
        rank=env.rank, world_size=env.world_size, device=device, dtype=torch.float32,
        num_workers=cfg.num_workers, report_dir=report_dir, scale=(cfg.min_scale, 1.0),
        auto_augment=RandAugment.parse(cfg.aa) if cfg.aa else None,
    )  # fmt: skip
    optimizer = build_optimizer(cfg, model, peak_lr, device)
    # fp16 needs loss scaling (the official code's NativeScaler): the grads reaching the encoder
    # through the head's 2e-5 init are ~1e-7, zero in fp16, and only the head and norm would train
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    if main and isinstance(optimizer, LARS) and (reach := lars_reach(cfg, peak_lr, total, steps_per_epoch)) < 1:
        print(
            f"warning: LARS at lr {peak_lr:.3g} (blr {cfg.blr:g} x effective batch {eff_batch} / 256) can move the "
            f"head's weights by only ~{reach:.2g}x their norm in {total} steps: it would stay near its random init "
            "(the recipe's batch 16384 gives lr 6.4). For small batches use e.g. --optimizer adamw --blr 1e-2",
            flush=True,
        )
    mix = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mix = Mixup(num_classes, cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.smoothing)
    step, best = 0, 0.0
    if resumed is not None:
        path, state = resumed
        try:  # what check_resumable cannot see (a checkpoint without its config): still one line
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):  # empty: a bf16 / fp32 run's (disabled) scaler; absent: an older one
                scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as e:
            detail = "; ".join(line.strip() for line in str(e).strip().splitlines()[:3])
            raise ConfigError(f"cannot resume {path}: {type(e).__name__}: {detail}") from None
        ckpt.set_rng_state(state["rng"])
        step, best = int(state["step"]), float(state["best_top1"])
        resumed = state = None  # the checkpoint's tensors are not held through the run
        if step >= total and (run_dir / "results.json").is_file():  # finished: its results stand
            loader.close()
            result = json.loads((run_dir / "results.json").read_text())
            if main:
                print(f"{cfg.mode}: {run_dir} finished at step {step} of {total}; its results stand (val top-1 "
                      f"{result['top1']:.2f}%, results.json). More --epochs continue it", flush=True)  # fmt: skip
            return result
    write_config()  # the resumed state fits: the run goes on under these settings

    compiled = cfg.compile if cfg.compile is not None else device.type == "cuda"
    fwd: torch.nn.Module = torch.compile(model) if compiled else model
    if env.enabled:
        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    log = MetricsLog(run_dir, resume_step=step or None) if main else None
    pbar = tqdm(total=total, initial=step, disable=not (main and cfg.progress), unit="step", file=sys.stdout)
    watch = loop.LossWatch(device, env)
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    model.train()
    try:
        with loop.stop_requests() as signals:  # a SIGTERM stops at the next log step, after a checkpoint
            while step < total:
                epoch = step // steps_per_epoch
                loader.set_epoch(epoch, start_step=step % steps_per_epoch)
                for images, labels in loader:
                    lr = lr_at(step / steps_per_epoch, peak_lr, cfg)
                    for g in optimizer.param_groups:
                        g["lr"] = lr * g["lr_scale"]
                    target = None
                    if cfg.reprob > 0 or mix is not None:
                        # the step's own generators: every rank mixes its own way, and a resume (whose
                        # checkpoint holds rank 0's RNG states only) mixes as the uninterrupted run
                        np_rng, py_rng, gen = step_generators(cfg.seed, env.rank, step, images.device)
                        if cfg.reprob > 0:
                            random_erase(images, cfg.reprob, py_rng, gen)
                        if mix is not None:
                            images, target = mix(images, labels, np_rng)
                    with autocast:
                        logits = fwd(images)
                    if target is not None:  # mixed: soft targets, the smoothing in them
                        loss = soft_target_cross_entropy(logits.float(), target)
                    else:
                        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    watch.add(loss, step)
                    step += 1
                    pbar.update(1)
                    stopping = False
                    if step % cfg.log_every == 0 or step % steps_per_epoch == 0 or step == total:
                        train_loss, stopping = watch.sync(bool(signals))
                        if not math.isfinite(train_loss):
                            raise FloatingPointError(f"non-finite training loss at step {step}: lower --blr / --lr")
                        record: dict[str, Any] = dict(
                            step=step, epoch=round(step / steps_per_epoch, 4), loss=train_loss, lr=lr
                        )
                        if step % steps_per_epoch == 0 or step == total:
                            metrics = evaluate(model, val_loader, autocast, num_classes)
                            best = max(best, metrics["top1"])
                            record.update(val_top1=metrics["top1"], val_top5=metrics["top5"])
                        if main:
                            log.write(record)
                            if not cfg.progress:  # a batch job's log shows the run going, as pretraining's
                                print(record_line(record), flush=True)
                            pbar.set_postfix(
                                loss=f"{train_loss:.3f}", top1=f"{metrics.get('top1', 0):.1f}", refresh=False
                            )
                    saved = None
                    if main and (step % steps_per_epoch == 0 or step == total or stopping):
                        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                 "best_top1": best, "rng": ckpt.rng_state(), "config": to_dict(cfg),
                                 "architecture": arch, "scaler": scaler.state_dict(), "effective_batch": eff_batch,
                                 "steps_per_epoch": steps_per_epoch, "classes": train_src.classes}  # fmt: skip
                        saved = ckpt.save_checkpoint(state, run_dir, step, keep_last=1)
                    if stopping:
                        raise Stopped(step, saved)
                    if step == total:
                        break
    finally:
        pbar.close()
        if log is not None:
            log.close()
        loader.close()
    if not metrics:
        metrics = evaluate(model, val_loader, autocast, num_classes)
    result = {"mode": cfg.mode, "step": step, "top1": metrics["top1"], "top5": metrics["top5"], "n_val": metrics["n"], "best_top1": max(best, metrics["top1"]),
              "minutes": (time.perf_counter() - t0) / 60}  # fmt: skip
    if main:
        write_results(run_dir, result)
        print(f"{cfg.mode}: val top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  (best top-1 "
              f"{result['best_top1']:.2f}%); run dir {run_dir}", flush=True)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = distributed.parse_together(parse_args, argv)
    try:
        finetune(cfg)
        distributed.end_together()
    except (ConfigError, DataError, AttentionBackendError) as e:
        # as pretraining's: a setting's error is every rank's, and rank 0 says it once; one met reading
        # this node's files (the data, the checkpoint) may be no other rank's, so that rank says it
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if (isinstance(e, DataError) or getattr(e, "rank_local", False)) and world > 1:
            print(f"{PROG}: error: [rank {rank}] {e}", file=sys.stderr)
        elif rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a diverged run: the step and a hint, not a traceback
        if int(os.environ.get("RANK", "0")) == 0:  # every rank's loss: said once
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        run_dir = cfg.run_dir or f"runs/finetune-{cfg.mode}"
        if not ckpt.list_checkpoints(run_dir):
            print(f"{PROG}: interrupted before the run's first checkpoint: nothing to continue", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted; continue from the last checkpoint with {PROG} --run-dir "
                  f"{shlex.quote(str(run_dir))} --resume auto", file=sys.stderr)  # fmt: skip
        return 130
    except Stopped as e:
        run_dir = cfg.run_dir or f"runs/finetune-{cfg.mode}"
        print(f"{PROG}: {e}; continue with {PROG} --run-dir {shlex.quote(str(run_dir))} --resume auto", file=sys.stderr)
        return EXIT_STOPPED
    finally:
        release_run_dirs()
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
