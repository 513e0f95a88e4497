"""DALI backend: decode + MAE augmentation in a DALI pipeline (nvJPEG / hardware decoder on CUDA).

Design: the host feeds the pipeline through ``fn.external_source`` with the encoded bytes of
each batch, in the order of :class:`~fastmae.data.sampling.EpochPlan`, together with the crop
window and flip of every sample, drawn on the host by :mod:`fastmae.data.transforms` from the
image header's size and the sample's ``(seed, epoch, index)`` generator. So the DALI backend and
the reference backend read the same images in the same order with the same crop windows and
flips; they differ only in the decoders' and resize filters' rounding. Owning the feed (rather
than ``fn.readers.file`` + ``fn.random_resized_crop``) is what gives exact resume at
(epoch, step), sharding identical to the reference loader, and bad-file handling.

Pipeline: ``external_source`` (bytes, anchor, shape, flip, label) ->
``decoders.image_slice`` (``device="mixed"`` on CUDA, ``"cpu"`` otherwise; ROI decode of the
crop window; RGB; no EXIF rotation, like :func:`~fastmae.data.transforms.load_rgb`) ->
``resize`` to S x S (cubic, antialiased) -> ``crop_mirror_normalize`` (flip, ImageNet mean/std,
CHW, float32 or float16) -> torch tensors on the training device (``feed_ndarray`` on the
current stream: no host round trip on CUDA), cast to the training dtype there.
``prefetch_queue_depth`` batches are prepared ahead.

Bad files: before feeding, the host reads the bytes and parses the header. An empty file or a
non-image is skipped at once; a JPEG without its end-of-image marker (truncated), or whose
headers libjpeg would refuse (:func:`~fastmae.data.encoded.jpeg_header_problem`), is skipped if
a full PIL decode fails too. Skipping uses the reference loader's stand-in rule, so both
backends give the same batch. A file that passes these checks but still makes DALI fail (e.g.
corrupt Huffman tables) stops the whole pipeline (DALI has no per-sample error): the loader then
finds the in-flight files DALI cannot decode (see ``_diagnose``), marks them bad, rebuilds the
pipeline and resumes at the same step. A file PIL reads but DALI cannot (a GIF named .png), or
decodes to another size than the header's, is decoded on the host from then on and fed
re-encoded as PNG; so is, from the start, a PGM/PPM with a maxval other than 255 or 65535, which
PIL rescales to the full range and DALI does not. One difference remains: a JPEG with garbled
entropy data is decoded by libjpeg-turbo / nvJPEG with a warning (garbage in part of the image)
where PIL refuses it, so the reference loader skips it and this one uses it. Every bad file is
reported in the log and in ``report_dir/bad_files.txt``.

DALI is optional: importing this module works without it; constructing :class:`DaliLoader`
without it raises a one-line :class:`~fastmae.data.sources.DataError`.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import weakref
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from fastmae.data.encoded import (
    describe,
    encoded_size,
    jpeg_header_problem,
    looks_truncated,
    png_bytes,
    pnm_rescaled,
    read_bytes,
)
from fastmae.data.sampling import EpochPlan, ScheduledLoader, candidates, sample_generator, tried_indices
from fastmae.data.sources import BadFileReport, DataError, ShardDataError, Source
from fastmae.data.transforms import (
    CROP_RATIO,
    CROP_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_rgb,
    sample_params,
)


def _error_line(error: BaseException) -> str:
    """What a DALI error says failed, on one line: its first lines are often only "Critical error
    in pipeline:", the operator and the cause come later, between a traceback and boilerplate."""
    lines = [line.strip().rstrip(" :,") for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    operator = next((line for line in lines if line.startswith("Error in")), None)
    # the cause follows "encountered:", after the operator's definition site (a traceback's File and
    # source lines)
    after = next((i + 1 for i, line in enumerate(lines) if line.startswith("encountered")), None)
    cause = lines[after] if after is not None and after < len(lines) else None
    if operator is None and cause is None:
        noise = ("Critical error in pipeline", "Current pipeline object")
        telling = [line for line in lines if not line.startswith(noise)]
        return "; ".join(telling[:2])[:300] or type(error).__name__
    return "; ".join(part for part in (operator, cause) if part)[:300]


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


def _require_dali():
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
    except Exception as exc:
        raise DataError(
            f"the 'dali' data backend needs NVIDIA DALI ({type(exc).__name__}: {exc}); "
            "pip install nvidia-dali-cuda130, or use the 'torch' backend"
        ) from None
    return fn, types, pipeline_def


_fork_guard = False


def _guard_forked_children() -> None:
    """Once this process builds DALI pipelines: a forked child (a DataLoader worker, e.g. the
    evaluation loader's) freezes the objects it inherits, so that its garbage collector never tears
    down a pipeline the parent had dropped but not yet collected. The pipeline's threads do not
    exist in the child, and its ``Shutdown`` there waited on them for ever (seen: a worker hung at
    its first allocation). The child's own objects are collected as usual."""
    global _fork_guard
    if not _fork_guard and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=gc.freeze)
        _fork_guard = True


class _Fed:
    """A batch fed to the pipeline and not yet returned by it."""

    __slots__ = ("pos", "used", "bad", "error")

    def __init__(self, pos: tuple[int, int], used: list[int], bad: list, error: Exception | None = None):
        self.pos = pos  # (epoch, step)
        self.used = used  # dataset indices fed
        self.bad = bad  # (path, reason) of the files skipped for it: reported when it is delivered
        self.error = error  # a data error held back until the batch is due (a stand-in was fed)


class _Feeder:
    """The ``external_source`` callable: one call = one step's host batch, in plan order.

    It starts at (epoch, step) and runs on into the following epochs, so one pipeline serves a
    whole run and its prefetch queue carries over epoch ends (building a mixed pipeline costs
    seconds: a rebuild per epoch cost 3.6-4.3 s per epoch on an H200). ``inflight`` holds the
    batches fed and not yet returned, oldest first: the next ``run()`` returns ``inflight[0]``.
    Feeding ahead must not act before the batch is due: the files it skips are reported on
    delivery, and a data error (no readable stand-in) is held back with the batch and raised when
    it is due, so an epoch the run never reaches cannot end the one it is in.

    The files of the next step are read ahead on the loader's I/O threads (reads release the
    GIL; on network file systems per-file latency, not bandwidth, is what limits a serial read).
    """

    def __init__(self, loader: DaliLoader, epoch: int, step: int):
        # a proxy: the pipeline holds this callable, and a loader dropped without close() must not
        # be kept alive (with its pipeline's threads and GPU memory) by that cycle until a gc pass
        self.loader = weakref.proxy(loader)
        self.next = (epoch, step)  # the position the next call feeds
        self.inflight: deque[_Fed] = deque()
        self.ahead: dict[tuple[int, int], list] = {}
        self._last: tuple | None = None  # the last batch fed: the stand-in for one held back

    def head(self) -> tuple[int, int]:
        """(epoch, step) of the batch the pipeline's next ``run()`` returns."""
        return self.inflight[0].pos if self.inflight else self.next

    def skip_to(self, pos: tuple[int, int]) -> None:
        """Feed from ``pos`` on (a position at or after ``next``); what is in flight stays."""
        if pos != self.next:
            self.next = pos
            self.ahead.clear()

    def _after(self, pos: tuple[int, int]) -> tuple[int, int]:
        epoch, step = pos
        return (epoch, step + 1) if step + 1 < len(self.loader) else (epoch + 1, 0)

    def _read_ahead(self, pos: tuple[int, int]) -> list:
        ld = self.loader
        paths = [ld.source.samples[int(i)][0] for i in ld.plan.batch_indices(*pos)]
        return [ld._io_pool().submit(read_bytes, p) for p in paths]

    def __call__(self):
        pos = self.next
        self.next = self._after(pos)
        ld = self.loader
        epoch, step = pos
        idx = ld.plan.batch_indices(epoch, step)
        if ld.io_threads > 0:
            reads = [r.result() for r in self.ahead.pop(pos, None) or self._read_ahead(pos)]
            self.ahead[self.next] = self._read_ahead(self.next)
        else:
            reads = [None] * len(idx)
        enc, anchors, shapes, flips, labels, used, bad = [], [], [], [], [], [], []
        try:
            for index, read in zip(idx, reads, strict=True):
                data, params, j = ld._prepare(epoch, int(index), read, bad)
                enc.append(np.frombuffer(data, dtype=np.uint8))
                anchors.append((params.left, params.top))
                shapes.append((params.width, params.height))
                flips.append(int(params.flip))
                labels.append(ld.source.samples[j][1])
                used.append(j)
        except DataError as exc:
            if self._last is None:  # the batch asked for now: nothing to hold back
                ld.bad_files.extend(bad)
                raise
            self.inflight.append(_Fed(pos, [], bad, exc))
            return self._last
        self.inflight.append(_Fed(pos, used, bad))
        self._last = (
            enc,
            np.asarray(anchors, dtype=np.float32),
            np.asarray(shapes, dtype=np.float32),
            np.asarray(flips, dtype=np.int32),
            np.asarray(labels, dtype=np.int64),
        )
        return self._last


class DaliLoader(ScheduledLoader):
    """DALI loader with the reference loader's schedule and augmentation parameters.

    Args:
        source: the samples.
        batch_size: per-rank batch B.
        image_size: output side S.
        seed: data seed (order and augmentation).
        rank, world_size: shard of this process.
        device: ``"cuda[:i]"`` decodes with ``device="mixed"`` on GPU i; ``"cpu"`` runs a
            CPU-only pipeline (``device_id=None``).
        dtype: dtype of the delivered images (float16 straight from DALI; others cast on device).
        num_threads: DALI CPU threads.
        prefetch: DALI ``prefetch_queue_depth``.
        report_dir: folder for ``bad_files.txt`` (None: log only).
        scale, ratio: RandomResizedCrop bounds.
        hw_decoder_load: share of JPEGs sent to the hardware decoder (A100/H100) in mixed mode.
        jpeg_fancy_upsampling: in mixed mode, upsample chroma by interpolation as libjpeg-turbo and
            PIL do (the reference loader's rounding); False takes nvJPEG's default (nearest), which
            may be faster. The CPU pipeline always interpolates.
        io_threads: threads reading the next batch's files ahead (0: read in the feeding thread).

    Iterating yields ``(images [B, 3, S, S] dtype on device, labels [B] int64 on device)``.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        image_size: int = 224,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_threads: int = 4,
        prefetch: int = 2,
        report_dir: str | os.PathLike | None = None,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
        hw_decoder_load: float = 0.65,
        io_threads: int = 4,
        jpeg_fancy_upsampling: bool = True,
    ):
        self._fn, self._types, self._pipeline_def = _require_dali()
        super().__init__(EpochPlan(len(source), batch_size, seed, rank, world_size))
        self.source = source
        self.image_size = image_size
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.scale = scale
        self.ratio = ratio
        self.hw_decoder_load = hw_decoder_load
        self.jpeg_fancy_upsampling = jpeg_fancy_upsampling
        self.bad_files = BadFileReport(report_dir, rank, world_size)
        self.bad_files.extend((p, "missing") for p in source.missing)
        self._bad_idx: dict[int, str] = {}  # dataset indices known unreadable -> why
        # a resumed run's report: its files are skipped without another failed pipeline run each
        # (a rebuild costs seconds on a GPU); the uninterrupted run knew them by then too
        if self.bad_files.count:
            index_of = {path: j for j, (path, _) in enumerate(source.samples)}
            for path, reason in self.bad_files.reasons.items():
                if path in index_of:
                    self._bad_idx[index_of[path]] = reason
        self._host_decode: set[int] = set()  # readable by PIL, not by DALI
        self._pil_reads: set[int] = set()  # in doubt on the host (truncated? headers?), read by PIL
        self.io_threads = io_threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.rebuilds = 0  # pipelines rebuilt after a decode failure
        # decode only the crop window (not with fancy upsampling on the GPU: see _build)
        self._roi_decode = not (self.device.type == "cuda" and jpeg_fancy_upsampling)
        self.builds = 0  # pipelines built (one per run, plus one per rebuild or repositioning)
        self._pipe = None
        self._feeder: _Feeder | None = None

    # ---- host side -------------------------------------------------------------------------

    def _io_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.io_threads, thread_name_prefix="fastmae-io")
        return self._pool

    def _mark_bad(self, j: int, reason: str) -> None:
        """Skip dataset index ``j`` from now on; it is reported with the first batch delivered that skipped it."""
        self._bad_idx[j] = reason

    def _prepare(self, epoch: int, index: int, first: bytes | Exception | None = None, bad: list | None = None):
        """Encoded bytes, crop params and the dataset index actually used for slot ``index``.

        ``first``: the bytes of ``index``'s own file when already read (or the read's error).
        ``bad``: gets (path, reason) of each unreadable candidate skipped for the slot.
        """
        samples = self.source.samples
        bad = [] if bad is None else bad
        for attempt, j in candidates(self.plan.seed, epoch, index, len(samples)):
            if j in self._bad_idx:
                bad.append((samples[j][0], self._bad_idx[j]))
                continue
            path = samples[j][0]
            try:
                if j in self._host_decode:
                    data = png_bytes(path)
                else:
                    data = first if attempt == 0 and first is not None else read_bytes(path)
                    if isinstance(data, Exception):
                        raise data
                    # PIL decides: a clean decode means trailing bytes only, or headers the check
                    # refuses and libjpeg reads. Headers DALI's decoder refuses would stop the
                    # pipeline and cost a rebuild each (seconds on a GPU: an hour per 1k such files)
                    if j not in self._pil_reads and (looks_truncated(data) or jpeg_header_problem(data)):
                        load_rgb(path)
                        self._pil_reads.add(j)  # decided once: not a PIL decode each time it is drawn
                    if pnm_rescaled(data):
                        self._host_decode.add(j)
                        data = png_bytes(path)
                h, w = encoded_size(data)
            except Exception as exc:
                self._mark_bad(j, describe(exc, path))
                bad.append((path, self._bad_idx[j]))
                continue
            gen = sample_generator(self.plan.seed, epoch, index, attempt)
            return data, sample_params(h, w, gen, self.scale, self.ratio), j
        raise ShardDataError(
            f"{len(tried_indices(self.plan.seed, epoch, index, len(samples)))} unreadable images in a row "
            f"standing in for {samples[index][0]}; the data set looks broken (see the bad-file report)"
        )

    # ---- pipeline --------------------------------------------------------------------------

    def _build(self, feeder: _Feeder):
        _guard_forked_children()
        fn, types = self._fn, self._types
        gpu = self.device.type == "cuda"
        size = self.image_size
        out_dtype = types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT
        decoder_kw = {"hw_decoder_load": self.hw_decoder_load} if gpu else {}

        @self._pipeline_def
        def mae_pipeline():
            encoded, anchor, shape, flip, label = fn.external_source(
                source=feeder,
                num_outputs=5,
                batch=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT64],
            )
            decode = dict(
                device="mixed" if gpu else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,
                jpeg_fancy_upsampling=self.jpeg_fancy_upsampling,  # True: PIL/libjpeg's chroma upsampling
                **decoder_kw,
            )
            window = dict(normalized_anchor=False, normalized_shape=False)
            if not self._roi_decode:
                # nvJPEG < 13.2 cannot decode a region with fancy upsampling: DALI then decodes the
                # whole image anyway, with a warning per image on every decoder thread (7 MB of log
                # in 3 minutes on an H200). Say so: decode whole, then cut the window on the GPU.
                images = fn.slice(fn.decoders.image(encoded, **decode), anchor, shape, **window)
            else:
                images = fn.decoders.image_slice(encoded, anchor, shape, **decode, **window)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.crop_mirror_normalize(
                images,
                mirror=flip,
                mean=[255 * m for m in IMAGENET_MEAN],
                std=[255 * s for s in IMAGENET_STD],
                dtype=out_dtype,
                output_layout="CHW",
            )
            return images, (label.gpu() if gpu else label)

        pipe = mae_pipeline(
            batch_size=self.plan.batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if gpu else None,
            prefetch_queue_depth=self.prefetch,
            seed=self.plan.seed,
        )
        pipe.build()
        return pipe

    def _to_torch(self, out) -> torch.Tensor:
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

            t = out.as_tensor()
            dst = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=self.device)
            feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
            return dst
        return torch.from_numpy(np.array(out.as_tensor()))

    def _diagnose(self, feeder: _Feeder, error: Exception) -> None:
        """After a pipeline failure: find the in-flight files DALI cannot decode.

        DALI decides, so a file is skipped on this backend exactly when DALI cannot decode it
        (whatever else shares its batch): files PIL refuses are probed one by one with DALI's
        decoder and skipped if it fails too; only when none is to blame are the files PIL reads
        probed, and those DALI fails on are decoded on the host from then on.
        """
        self.rebuilds += 1
        suspects = [
            j
            for j in dict.fromkeys(j for fed in feeder.inflight for j in fed.used)
            if j not in self._bad_idx and j not in self._host_decode
        ]
        pil_ok = []
        found = False
        for j in suspects:
            try:
                load_rgb(self.source.samples[j][0])
            except Exception as exc:
                if not self._dali_decodes(self.source.samples[j][0]):
                    self._mark_bad(j, describe(exc, self.source.samples[j][0]))
                    found = True
            else:
                pil_ok.append(j)
        if found:
            return
        for j in pil_ok:
            if not self._dali_decodes(self.source.samples[j][0]):
                self._host_decode.add(j)
                found = True
        if not found:
            raise ShardDataError(f"DALI pipeline failed and no input file is to blame: {_error_line(error)}")

    def _dali_decodes(self, path: str) -> bool:
        """Whether this loader's DALI decoder (CPU, or mixed on the GPU) decodes the file alone,
        unrotated as the pipeline does, to the size the host drew its crop window from.

        A decoded size other than the header's means the crop window can fall outside the image
        (it did for rotated TIFFs, whose size PIL reports rotated): such a file is not decoded
        the same way, so it goes to the host decoder rather than stopping the run unexplained.
        """
        fn, types = self._fn, self._types
        gpu = self.device.type == "cuda"
        try:
            with open(path, "rb") as f:
                raw = f.read()
            want = encoded_size(raw)
        except Exception:
            return False
        data = np.frombuffer(raw, dtype=np.uint8)

        _guard_forked_children()

        @self._pipeline_def(batch_size=1, num_threads=1, device_id=self.device.index if gpu else None)
        def probe():
            encoded = fn.external_source(source=lambda: [data], batch=True)
            return fn.decoders.image(
                encoded, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False
            )

        try:
            p = probe()
            p.build()
            (out,) = p.run()
            decoded = tuple(out.shape()[0][:2])
        except Exception:
            return False
        return decoded == tuple(want)

    @property
    def buffered_batches(self) -> int:
        return self.prefetch

    @property
    def workers(self) -> int:
        return self.num_threads

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        steps = self._steps()
        # One pipeline serves successive passes: it is rebuilt only when its next batch is not the
        # one asked for (set_epoch / load_state_dict elsewhere) or after a failure. A failed run is
        # diagnosed, and the pipeline rebuilt to resume at self.step. Each diagnosis marks at least
        # one in-flight file (bad, or decoded on the host from then on) or raises, so the rebuilds
        # end however many files are bad (a cap on rebuilds in a row stopped a run with half its
        # files corrupt, where the reference loader trains through). The 16-candidate rule of the
        # sampling plan ends a data set where nearly everything is bad.
        while self.step < steps.stop:
            try:
                if not self._at((self.epoch, self.step)):
                    self._drop_pipeline()
                    self._feeder = _Feeder(self, self.epoch, self.step)
                    self._pipe = self._build(self._feeder)
                    self.builds += 1
                try:
                    images, labels = self._pipe.run()
                except RuntimeError as exc:
                    try:
                        self._diagnose(self._feeder, exc)
                    finally:
                        self._drop_pipeline()
                    continue  # rebuild and resume at self.step
                fed = self._feeder.inflight.popleft()
                self.bad_files.extend(fed.bad)
                if fed.error is not None:
                    raise fed.error
                images = self._to_torch(images).to(self.dtype)
                labels = self._to_torch(labels)
            except BaseException:
                # Ctrl-C inside run(), a data error: the pipeline's place is no longer known
                self._drop_pipeline()
                raise
            self.step += 1
            yield images, labels

    def _at(self, pos: tuple[int, int]) -> bool:
        """Whether the pipeline's next batch is ``pos``, after running off the batches in flight
        before it (at most the prefetch depth: a pass cut short by gradient accumulation, whose
        last micro-batches of an epoch go unused) and feeding from ``pos`` on."""
        feeder = self._feeder
        if self._pipe is None or feeder is None or feeder.head() > pos:
            return False
        if feeder.next < pos:
            feeder.skip_to(pos)
        try:
            while feeder.inflight and feeder.inflight[0].pos < pos:
                self._pipe.run()
                feeder.inflight.popleft()
        except Exception:
            return False  # a batch never delivered failed: rebuild at pos
        return feeder.head() == pos

    def _drop_pipeline(self) -> None:
        self._pipe = self._feeder = None

    def close(self) -> None:
        """Free the pipeline and stop the read-ahead threads (both restart if iterated again)."""
        self._drop_pipeline()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> DaliLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
