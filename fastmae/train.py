"""MAE pre-training: ``python -m fastmae.train`` (one process) or ``torchrun ... -m fastmae.train``.

With no arguments it runs the ``demo`` preset: a tiny MAE on an image set generated on first use
(real JPEGs through the real loader), a few minutes on a laptop CPU. ``--help`` lists the presets
and every field of :class:`fastmae.config.Config`.

The loop, in order of what matters for speed: the loaders prefetch (DataLoader workers or DALI,
pinned memory and non-blocking copies on CUDA); the model runs the fused Triton path under bf16
autocast and ``torch.compile``; AdamW is fused; the loss is accumulated on the device and read
back (``.item()``-like host syncs) only at log steps. A non-finite loss is caught at the next log
step (every checkpoint step is one), and the checkpoint whose weights gave it, if one was saved just
before, is set aside so that ``--resume auto`` starts from a verified one.

Determinism: a step's images and masking noise depend only on (seed, step), not on the number
of processes or accumulation steps, so ``4 GPUs x 64 x accum 2`` trains on exactly what
``1 GPU x 512`` would, and a resumed run continues the very same sequence.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from fastmae import checkpoint as ckpt
from fastmae import distributed, loop, messages
from fastmae.attention import AttentionBackendError, resolve_backend
from fastmae.config import Config, ConfigError, accum_iter, learning_rate, parse_config
from fastmae.data import (
    BadFileReport,
    DataError,
    ShardDataError,
    sample_seed,
)
from fastmae.distributed import rank_local
from fastmae.log import MetricsLog, record_line, run_environment
from fastmae.messages import PROG, start_line
from fastmae.model import MaskedAutoencoderViT, param_groups_weight_decay, resolve_activation_checkpointing
from fastmae.run_data import check_same_data, knn_images, open_data
from fastmae.rundir import Resumed, held_run_dir, release_run_dirs, resolve_run_dir, resume

EXIT_BAD_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_OOM = 4
EXIT_DIST_TIMEOUT = 5
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request, after a checkpoint
# a node's own, the others' need not match: workers, progress bar, device flag, how it computes (the
# same function), what rank 0 alone uses, how long it waits
LOCAL_SETTINGS = (
    "num_workers", "progress", "device", "compile", "compile_mode", "activation_checkpointing", "attn_backend",
    "decoder_attn_backend", "fused", "vis_samples", "vis_every_epochs", "keep_last", "keep_every_epochs",
    "dist_timeout", "knn_max_images",
)  # fmt: skip
_NOISE_SALT = 0x4D41534B  # "MASK": keeps the noise stream apart from the data's sample seeds


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message names the step, the last good checkpoint and a hint."""


def nonfinite_loss(bad: int, log_step: int, last: str | None) -> NonFiniteLoss:
    """The error of a non-finite loss at step ``bad``, found at ``log_step``: where to go on from."""
    return NonFiniteLoss(
        f"non-finite loss at step {bad} (found at the log step {log_step}); "
        f"last good checkpoint: {last if last else 'none yet'}"
        f"{' (continue with --resume auto)' if last else ''}. "
        "Try a lower --blr/--lr, more --warmup-epochs, --precision fp32 (no autocast, no TF32), "
        "--attn-backend math (the reference's attention), or --no-compile"
    )


@dataclass
class TrainResult:
    """What a finished (or stopped) run left behind."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: Path
    pictures: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped: bool = False  # by SIGTERM / SIGUSR1, after a checkpoint
    bad_files: int = 0  # unreadable images skipped, all ranks (rank 0's count)
    bad_files_report: Path | None = None
    schedule_done: bool = False  # every epoch of the schedule ran (continuing means more --epochs)
    world_size: int = 1  # the processes it ran on
    start_step: int = 0  # the step this invocation began at (a resumed run's checkpoint)


# ------------------------------------------------------------------------------------------- recipe


def lr_at(epoch: float, peak_lr: float, cfg: Config) -> float:
    """The reference's ``adjust_learning_rate``: linear warm-up, then half-cycle cosine to ``min_lr``.

    ``epoch`` is fractional (epoch + step / steps_per_epoch), so the schedule moves every step.
    """
    if epoch < cfg.warmup_epochs:
        return peak_lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    return cfg.min_lr + (peak_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def masking_noise(gen: torch.Generator, seed: int, step: int, rows: int, num_patches: int) -> torch.Tensor:
    """The masking noise ``(rows, L)`` of optimizer step ``step`` for the whole effective batch.

    Drawn from a generator seeded by (seed, step) and sliced per micro-step and rank by the caller,
    so the masks do not depend on the world size or the accumulation, and a resumed run draws the
    same noise as one that never stopped. Seeding is host-side: no sync.
    """
    gen.manual_seed(sample_seed(seed ^ _NOISE_SALT, step, 0))
    return torch.rand(rows, num_patches, generator=gen, device=gen.device)


def compiles(cfg: Config, device: torch.device) -> bool:
    """Whether the run compiles its model: ``--compile``, else on CUDA only."""
    return cfg.compile if cfg.compile is not None else device.type == "cuda"


def attention_backends(cfg: Config, device: torch.device) -> dict[str, str]:
    """The encoder's and the decoder's attention on ``device``, each resolved on its own (``auto``
    gives the decoder, head dim 32, fastmae's Triton kernel at compute capability 9.0, see
    fastmae.attention)."""
    decoder = cfg.attn_backend if cfg.decoder_attn_backend == "same" else cfg.decoder_attn_backend
    return {
        "attn_backend": resolve_backend(cfg.attn_backend, device, cfg.embed_dim // cfg.num_heads, "encoder"),
        "decoder_attn_backend": resolve_backend(
            decoder, device, cfg.decoder_embed_dim // cfg.decoder_num_heads, "decoder"
        ),
    }


def build_model(cfg: Config, device: torch.device) -> MaskedAutoencoderViT:
    """The MAE of ``cfg``, initialised from ``cfg.seed`` (the same on every rank)."""
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    triton_attention = "triton" in (cfg.attn_backend, cfg.decoder_attn_backend)
    if (fused or triton_attention) and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors run interpreted
    torch.manual_seed(cfg.seed)
    model = MaskedAutoencoderViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        decoder_embed_dim=cfg.decoder_embed_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads,
        mlp_ratio=cfg.mlp_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
        **attention_backends(cfg, device),
        fused=fused,
        activation_checkpointing=resolve_activation_checkpointing(
            cfg.activation_checkpointing, device, compiles(cfg, device)
        ),
        residual_dtype=cfg.residual_dtype,
    )
    return model.to(device)


def resolve_precision(cfg: Config, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(name, autocast dtype): bf16 on CUDA, fp32 (no autocast) on CPU, unless ``cfg.precision`` says otherwise."""
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return precision, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


# ------------------------------------------------------------------------------------------- set-up


def check_settings(cfg: Config, peak_lr: float, precision: str) -> None:
    """The one-line errors of settings that only make sense together."""
    if cfg.min_lr > peak_lr:  # the cosine would climb from the peak to the floor
        raise ConfigError(
            f"min_lr {cfg.min_lr:g} is above the peak lr {peak_lr:g} (blr x effective batch / 256, or --lr); "
            "lower --min-lr"
        )
    if cfg.residual_dtype == "autocast" and precision != "bf16":
        raise ConfigError(
            f"--residual-dtype autocast keeps the residual stream in bf16 and needs --precision bf16 "
            f"(this run: {precision}; fp32 would leave it unchanged, an fp16 stream can overflow)"
        )


def decide_run_dir(cfg: Config, main: bool) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume or None): rank 0 decides (one view of the file system)
    and holds the directory; every rank gets its answer or its error."""
    try:
        decided = resolve_run_dir(cfg) if main else None
        if main and decided[1] is None:  # fresh: before any rank's loader can write its report
            BadFileReport.discard(decided[0])
    except ConfigError as e:
        decided = e
    decided = distributed.broadcast_object(decided)
    if isinstance(decided, ConfigError):
        raise decided
    return decided


def load_init(model: MaskedAutoencoderViT, cfg: Config) -> str:
    """Load ``--init-from`` into ``model`` (every rank reads it; DDP would broadcast rank 0's anyway);
    returns what was loaded, for the start line."""
    from fastmae.pretrained import init_weights

    try:
        return init_weights(model, cfg.init_from, num_heads=(cfg.num_heads, cfg.decoder_num_heads))
    except ValueError as e:
        raise ConfigError(f"--init-from {cfg.init_from}: {e}") from None


def build_knn(cfg: Config, loader: Any, device: torch.device, main: bool) -> Any:
    """The kNN monitor, built by rank 0 (which alone runs it; None on the others) before anything is
    written; every rank gets its error (no labels, an empty val split, ...)."""
    knn = None
    try:
        if main:
            from fastmae.knn import KnnMonitor

            knn = KnnMonitor(
                knn_images(cfg, loader), cfg.img_size, device, max_images=cfg.knn_max_images, seed=cfg.seed
            )
    except (ConfigError, DataError) as e:
        knn = e
    error = distributed.broadcast_object(knn if isinstance(knn, Exception) else None)
    if error is not None:
        raise error
    return knn


def open_records(cfg: Config, run_dir: Path, resolved: dict[str, Any], resumed: Resumed | None) -> MetricsLog | None:
    """Rank 0: write the run's ``config.json`` and open its metrics (a branch keeps the records of the
    timeline it leaves beside them); None, with both left as they ran, when a resumed run is at the
    end of its schedule already."""
    step, total = (resumed.step if resumed else 0), resolved["total_steps"]
    if resumed is not None and step >= total:
        print(
            f"the run is at step {step}, the end of this schedule ({total} steps): nothing to train; "
            "more --epochs continue it",
            flush=True,
        )
        return None
    ckpt.atomic_write_text(
        run_dir / "config.json", json.dumps({**cfg.to_dict(), "resolved": resolved}, indent=2) + "\n"
    )
    branch = resumed is not None and resumed.branched_from is not None
    return MetricsLog(run_dir, resume_step=step if resumed else None, superseded=branch)


# ------------------------------------------------------------------------------------------ the run


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training that ``cfg`` describes; raises ConfigError / DataError / NonFiniteLoss."""
    env = distributed.init_distributed(cfg.device, cfg.dist_timeout)
    # what may differ between nodes without changing the run: workers, the progress bar, the device flag
    distributed.start_together({k: v for k, v in cfg.to_dict().items() if k not in LOCAL_SETTINGS})
    device, main = env.device, env.is_main
    accum = accum_iter(cfg, env.world_size)
    eff_batch = cfg.batch_size * env.world_size * accum
    peak_lr = learning_rate(cfg, env.world_size)
    precision, dtype = resolve_precision(cfg, device)
    check_settings(cfg, peak_lr, precision)
    if device.type == "cuda":  # the few fp32 matmuls left under autocast; --precision fp32 means fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    run_dir, resume_path = decide_run_dir(cfg, main)

    # the model (seeded: the same on every rank) and its --init-from weights before the data, whose
    # scan can take minutes on a large folder: a checkpoint that does not fit is a one-line error first
    model = build_model(cfg, device)
    init = load_init(model, cfg) if resume_path is None and cfg.init_from else None
    try:
        loader, backend, vis_paths = open_data(cfg, env, run_dir)
    except DataError as e:  # each rank scans the data on its own node
        raise rank_local(e) from None
    if env.enabled:
        check_same_data(loader)
    opt_steps_per_epoch = len(loader) // accum
    if opt_steps_per_epoch == 0:
        raise DataError(
            f"one epoch has {len(loader)} batches of {cfg.batch_size} per process, fewer than the "
            f"{accum} micro-steps of one optimizer step (effective batch {eff_batch})"
        )
    total_steps = cfg.epochs * opt_steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    knn = build_knn(cfg, loader, device, main) if cfg.knn_every else None

    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, cfg.weight_decay), lr=peak_lr, betas=cfg.betas, fused=device.type == "cuda"
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    resumed = None
    if resume_path is not None:
        resumed = resume(cfg, run_dir, resume_path, model, optimizer, scaler, eff_batch, loader)
    elif cfg.resume == "auto" and main:
        print(f"no checkpoint in {run_dir}: starting a fresh run", flush=True)
    if resumed is not None and cfg.init_from and main:
        print(f"--init-from {cfg.init_from} not read: resuming, the checkpoint holds the weights", flush=True)
    step = resumed.step if resumed else 0

    compiled = compiles(cfg, device)
    if compiled and model.activation_checkpointing == "selective":
        messages.quiet_selective_checkpoint_notice()
    fwd_model: torch.nn.Module = (
        torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode) if compiled else model
    )
    if env.enabled:
        fwd_model = DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None)

    log = None
    pictures = None
    if main:
        resolved = dict(
            world_size=env.world_size,
            device=str(device),
            accum_iter=accum,
            effective_batch=eff_batch,
            lr=peak_lr,
            precision=precision,
            compile=compiled,
            fused=sorted(model.fused),
            attn_backend=model.attn_backend,
            decoder_attn_backend=model.decoder_attn_backend,
            activation_checkpointing=model.activation_checkpointing,
            data_backend=backend,
            data_workers=loader.workers,
            steps_per_epoch=opt_steps_per_epoch,
            total_steps=total_steps,
            environment=run_environment(device),
        )
        log = open_records(cfg, run_dir, resolved, resumed)
        what = f"resuming {resumed.checkpoint} at step {step}" if resumed else "fresh run"
        if init is not None:
            what += f" from {cfg.init_from} ({init})"
        print(f"{start_line(cfg, model, env, resolved)}; {what}; run dir {run_dir}", flush=True)
        if vis_paths and cfg.vis_samples:
            from fastmae.visualize import TrainingPictures

            pictures = TrainingPictures(
                model, vis_paths, cfg.vis_samples, cfg.img_size, cfg.mask_ratio, cfg.seed, run_dir, title=cfg.preset
            )

    result = TrainResult(
        run_dir=run_dir,
        step=step,
        checkpoint=resumed.checkpoint if resumed else None,
        metrics=run_dir / "metrics.jsonl",
        world_size=env.world_size,
        start_step=step,
    )
    checkpoints = ckpt.RunCheckpoints(
        run_dir,
        cfg.keep_last,
        cfg.keep_every_epochs,
        main,
        resumed_from=resumed.checkpoint if resumed else None,
        branched_from=resumed.branched_from if resumed else None,
    )
    watch = loop.LossWatch(device, env)
    noise_gen = torch.Generator(device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    B, world, rank = cfg.batch_size, env.world_size, env.rank
    t_interval, step_interval = time.perf_counter(), step
    t_start = time.time() - (log.resumed_time if log is not None else 0.0)  # the run's training time

    def log_interval(loss: float, epoch_f: float, lr: float) -> None:
        """Rank 0's record of the interval that ends at ``step``."""
        nonlocal t_interval, step_interval
        now = time.perf_counter()
        img_s = (step - step_interval) * eff_batch / max(now - t_interval, 1e-9)
        t_interval, step_interval = now, step
        if not main:
            return
        record = dict(
            step=step, epoch=round(epoch_f, 4), loss=loss, lr=lr, img_s=round(img_s, 1), time=time.time() - t_start
        )
        if device.type == "cuda":  # the allocator's own count: no device sync
            record["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        log.write(record)
        result.losses.append(loss)
        pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}", refresh=False)
        if not cfg.progress:
            print(record_line(record))

    def state() -> dict[str, Any]:
        return dict(
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(),
            step=step,
            epoch=epoch,
            loader=loader.state_dict(),
            rng=ckpt.rng_state(),
            config=cfg.to_dict(),
            world_size=world,
            effective_batch=eff_batch,
        )

    pbar = tqdm(
        total=total_steps,
        initial=step,
        disable=not (main and cfg.progress),
        unit="step",
        dynamic_ncols=True,
        file=sys.stdout,
    )
    model.train()
    epoch = step // opt_steps_per_epoch
    stop = False
    try:
        with loop.stop_requests() as signals:
            while step < total_steps and not stop:
                start_micro = (step % opt_steps_per_epoch) * accum
                loader.set_epoch(epoch, start_step=start_micro)
                micro = start_micro
                for images, _ in loader:
                    j = micro % accum
                    if j == 0:
                        # in optimizer steps, not micro-batches: len(loader) rounds per rank, so a fraction
                        # of it would move the schedule with the world size and the accumulation
                        lr = lr_at(step / opt_steps_per_epoch, peak_lr, cfg)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                        noise = masking_noise(noise_gen, cfg.seed, step, eff_batch, model.num_patches)
                    rows = (j * world + rank) * B  # this micro-batch's rows of the effective batch
                    last_micro = j == accum - 1
                    sync = nullcontext() if last_micro or not env.enabled else fwd_model.no_sync()
                    with sync:
                        with autocast:
                            loss, _, _ = fwd_model(images, mask_ratio=cfg.mask_ratio, noise=noise[rows : rows + B])
                        scaler.scale(loss / accum).backward()
                    watch.add(loss, step)
                    micro += 1
                    if not last_micro:
                        continue

                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    pbar.update(1)
                    epoch_end = step % opt_steps_per_epoch == 0
                    save = step % cfg.ckpt_every_steps == 0 or epoch_end or step == total_steps
                    if save or step % cfg.log_every == 0:
                        mean_loss, stop = watch.sync(bool(signals))
                        if not math.isfinite(mean_loss):
                            bad = watch.first_bad_step(step)
                            raise nonfinite_loss(bad, step, checkpoints.last_good(bad))
                        log_interval(mean_loss, step / opt_steps_per_epoch, lr)
                        save = save or stop
                    if save:
                        result.checkpoint = checkpoints.save(step, epoch, epoch_end, state)
                    if knn is not None and (
                        step == total_steps or (epoch_end and (epoch + 1) % cfg.knn_every == 0)
                    ):  # rank 0 only; the others wait at the next collective
                        acc = knn.evaluate(model, autocast)
                        epoch_f = round(step / opt_steps_per_epoch, 4)  # as the loss records count it
                        log.write(dict(step=step, epoch=epoch_f, knn_top1=acc["top1"], knn_top5=acc["top5"]))
                        pbar.write(f"step {step}: kNN top-1 {acc['top1']:.2f}%  top-5 {acc['top5']:.2f}%")
                    if pictures is not None and (
                        step == total_steps
                        or (epoch_end and cfg.vis_every_epochs and (epoch + 1) % cfg.vis_every_epochs == 0)
                    ):
                        # epochs counted as the metrics count them: the picture after the 3rd is epoch0003
                        pic = pictures.save(f"epoch{epoch + 1:04d}" if epoch_end else f"step{step:09d}", step)
                        if pic:
                            result.pictures.append(pic)
                    if save:  # the next interval's img/s counts training, not this checkpoint, kNN or picture
                        t_interval = time.perf_counter()
                    if epoch_end or step == total_steps or stop:
                        break
                epoch += not stop
    finally:
        pbar.close()
        if log is not None:
            log.close()
        if hasattr(loader, "close"):
            loader.close()
    result.step = step
    result.stopped = stop
    result.schedule_done = step >= cfg.epochs * opt_steps_per_epoch
    distributed.barrier()  # every rank's report written (its loader closed above)
    if main:
        result.bad_files, result.bad_files_report = BadFileReport.merge(run_dir)
    release_run_dirs()
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code.

    0 done, 2 bad configuration or data, 3 non-finite loss, 4 out of memory, 5 a collective timed out
    (torchrun), 130 Ctrl-C, 143 stopped by SIGTERM / SIGUSR1 after writing a checkpoint.
    """
    cfg = distributed.parse_together(parse_config, argv)  # exits 2 with a one-line message on a bad flag
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    is_main = rank == 0
    t0 = time.time()
    try:
        result = train(cfg)
        distributed.end_together()
    except (ConfigError, DataError, AttentionBackendError) as e:
        # A set-up error is every rank's: rank 0 says it once. One met reading this rank's own files
        # (its shard, its node's data or checkpoint) may be no other rank's (they only see a lost
        # peer): under torchrun that rank says it, with its rank.
        if (isinstance(e, ShardDataError) or getattr(e, "rank_local", False)) and world > 1:
            print(f"{PROG}: error: [rank {rank}] {e}", file=sys.stderr)
        elif is_main:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except NonFiniteLoss as e:
        if is_main:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except torch.OutOfMemoryError:
        print(f"{PROG}: error: {messages.out_of_memory_hint(cfg)}", file=sys.stderr)  # every rank: which one ran out
        return EXIT_OOM
    except RuntimeError as e:  # gloo's timeouts are plain RuntimeErrors, c10d's DistErrors
        text = str(e).lower()
        gloo = "timed out waiting" in text or "application timeout" in text
        if world == 1 or not (gloo or isinstance(e, torch.distributed.DistError) and "timeout" in text):
            raise
        # a collective waited --dist-timeout for the others: one died or hangs (its own output says
        # which), or rank 0's checkpoint write or kNN pass took longer than that
        print(
            f"{PROG}: error: [rank {rank}] waited --dist-timeout ({cfg.dist_timeout:g} min) for the other "
            "processes: one has stopped or hangs (see its output), or rank 0's checkpoint write or kNN pass "
            "took longer (raise --dist-timeout)",
            file=sys.stderr,
        )
        return EXIT_DIST_TIMEOUT
    except KeyboardInterrupt:
        if is_main:
            where = held_run_dir()
            if where is not None and not ckpt.list_checkpoints(where):
                print(f"{PROG}: interrupted before the run's first checkpoint: nothing to continue", file=sys.stderr)
            else:
                command = messages.continue_command(where, world) if where else f"{PROG} ... --resume auto"
                print(f"{PROG}: interrupted; continue from the last checkpoint with {command}", file=sys.stderr)
        return 130
    finally:
        release_run_dirs()
        distributed.cleanup()
    if result.stopped:
        if is_main:
            print(
                f"{PROG}: stopped by a signal at step {result.step}; checkpoint {result.checkpoint}; "
                f"continue with {messages.continue_command(result.run_dir, result.world_size)}",
                file=sys.stderr,
            )
        return EXIT_STOPPED
    if is_main:
        print(messages.summary(result, time.time() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
