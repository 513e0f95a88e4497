"""What the trainer tells its user beyond the metrics: parts of the start line, the summary at the
end, the out-of-memory hint, and a torch notice it silences."""

from __future__ import annotations

import logging
import os
import shlex
from typing import TYPE_CHECKING, Any

from fastmae.config import Config
from fastmae.model import resolve_activation_checkpointing

if TYPE_CHECKING:
    from fastmae.distributed import DistEnv
    from fastmae.model import MaskedAutoencoderViT
    from fastmae.train import TrainResult

PROG = "python -m fastmae.train"


def summary(result: TrainResult, seconds: float) -> str:
    losses = result.losses
    # a resumed run's time and losses are this invocation's: say from which step
    resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
    lines = [
        f"done: step {result.step}{resumed} in {seconds / 60:.1f} min"
        + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if len(losses) > 1 else ""),
        f"  run dir     {result.run_dir}",
        f"  checkpoint  {result.checkpoint}",
        f"  metrics     {result.metrics}",
        f"  config      {result.run_dir / 'config.json'}",
    ]
    if result.pictures:
        lines.append(
            f"  pictures    {result.pictures[-1]}"
            + (f" (+{len(result.pictures) - 1} earlier)" if len(result.pictures) > 1 else "")
        )
    if result.bad_files:
        lines.append(f"  bad files   {result.bad_files} skipped (unreadable or missing): {result.bad_files_report}")
    more = " --epochs N (more epochs than this schedule's)" if result.schedule_done else ""
    lines.append(f"continue:     {continue_command(result.run_dir, result.world_size)}{more}")
    return "\n".join(lines)


def continue_command(run_dir: os.PathLike | str, world_size: int) -> str:
    """The command that continues the run in ``run_dir``: under torchrun, torchrun with the run's
    processes per node (any number of processes continues it: the effective batch is kept)."""
    launch = PROG
    if world_size > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        launch = (
            f"torchrun --standalone --nproc_per_node {per_node} -m fastmae.train"
            if per_node == world_size
            else "torchrun (as this run was launched) -m fastmae.train"
        )
    return f"{launch} --run-dir {shlex.quote(str(run_dir))} --resume auto"  # pasted into a shell as printed


def compile_line(compiled: bool, mode: str) -> str:
    return f"True ({mode})" if compiled and mode != "default" else str(compiled)


def attention_line(model: MaskedAutoencoderViT) -> str:
    enc, dec = model.attn_backend, model.decoder_attn_backend
    return enc if enc == dec else f"{enc} (decoder {dec})"


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_selective_checkpoint_notice() -> None:
    """Drop dynamo's notice that a checkpoint ``context_fn`` must not wrap in-place ops.

    It is printed for every compiled run with selective checkpointing (now the default on CUDA); the
    blocks have no in-place op, and the results are tested bitwise equal to ``none``'s, compiled too
    (tests/test_activation_checkpointing.py, tests/kernels/test_compile_trace.py).
    """
    log = logging.getLogger("torch._higher_order_ops.wrap")
    if not any(isinstance(f, _DropMessage) for f in log.filters):
        log.addFilter(_DropMessage("context_fn is passed to torch.utils.checkpoint under torch.compile"))


def _smaller_batch(cfg: Config) -> str:
    """The largest per-process batch of at most half the current one that keeps the effective batch
    (so the recipe, and the results), with the accumulation that does; 1 always qualifies."""
    B, world = cfg.batch_size, int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.effective_batch and not cfg.accum_iter:  # the accumulation is derived from the effective batch
        b = max(d for d in range(1, B // 2 + 1) if cfg.effective_batch % (d * world) == 0)
        return f"--batch-size {b} (the effective batch {cfg.effective_batch} and so the recipe stay the same)"
    accum = cfg.accum_iter or 1
    b = max(d for d in range(1, B // 2 + 1) if (B * accum) % d == 0)
    return f"--batch-size {b} --accum-iter {B * accum // b} (the same effective batch {B * accum * world})"


def out_of_memory_hint(cfg: Config) -> str:
    """One line: what ran out, and the ways to fit that keep the run's results."""
    ways = []
    if cfg.batch_size > 1:
        ways.append(_smaller_batch(cfg))
    # what the run used (out of memory happens on CUDA, where compile is on unless turned off)
    used = resolve_activation_checkpointing(cfg.activation_checkpointing, "cuda", cfg.compile is not False)
    if used != "full":
        more = "selective (recomputes norms and GELU) or full" if used in ("none", "gelu") else "full"
        ways.append(f"--activation-checkpointing {more} (results unchanged)")
    where = f"out of memory at --batch-size {cfg.batch_size} per process (rank {os.environ.get('RANK', '0')})"
    if not ways:
        return f"{where} with full activation checkpointing: this model needs a GPU with more memory"
    return f"{where}; try " + ", or ".join(ways) + "; --resume auto continues a run"


def start_line(cfg: Config, model: MaskedAutoencoderViT, env: DistEnv, resolved: dict[str, Any]) -> str:
    """The run's first line: the model, the processes, the batch, the schedule and the fast path."""
    r = resolved
    return (
        f"{cfg.preset}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M params, "
        f"{env.world_size} process(es) on {env.device}, batch {cfg.batch_size} x {env.world_size} x accum "
        f"{r['accum_iter']} = {r['effective_batch']}, lr {r['lr']:.3g}, {r['total_steps']} steps "
        f"({r['steps_per_epoch']}/epoch), {r['precision']}, compile={compile_line(r['compile'], cfg.compile_mode)}, "
        f"fused={','.join(sorted(model.fused)) or 'off'}, attention={attention_line(model)}, "
        f"activation checkpointing={model.activation_checkpointing}, "
        + (f"residual stream={model.residual_dtype}, " if model.residual_dtype != "float32" else "")
        + f"data={r['data_backend']}{data_workers_note(cfg.num_workers, r)}"
    )


def data_workers_note(asked: int, resolved: dict[str, Any]) -> str:
    """`` (N workers)`` after the data backend; says so when ``--num-workers`` was cut to the CPUs."""
    backend, n = resolved["data_backend"], resolved.get("data_workers", 0)
    if backend == "synthetic":
        return ""
    kind = "threads" if backend == "dali" else "workers"
    if n == 0:
        return " (read in the main process)"
    if n < asked:
        return f" ({n} {kind}: --num-workers {asked} is more than the {n} CPUs this process may use)"
    return f" ({n} {kind})"
