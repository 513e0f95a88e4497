"""Generated image sets: the trainer's demo data, the benchmark's ImageNet-like JPEGs, and odd files.

``make_demo_dataset`` writes an ImageFolder tree of real JPEGs whose content an MAE can learn to
reconstruct: a smooth two-colour gradient background, a soft texture (stripes or checks), and a
few filled shapes, with mild sensor-like noise so the JPEGs cost about what photos cost to
decode. The class of an image is its largest shape (``ellipse``, ``rectangle``, ``triangle``,
``stripes``), so a linear probe has something to find. Generation is seeded and idempotent: a
manifest written last records the parameters, and a call with the same parameters on a finished
folder returns at once.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES = ("ellipse", "rectangle", "stripes", "triangle")
_MANIFEST = "fastmae_demo.json"


def _random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def render_image(rng: np.random.Generator, width: int, height: int, cls: int, noise: float = 4.0) -> Image.Image:
    """One structured RGB image of class ``DEMO_CLASSES[cls]``; ``noise``: grain std in grey levels."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx / width + np.sin(angle) * yy / height + 1) / 2
    c0, c1 = np.array(_random_color(rng), np.float32), np.array(_random_color(rng), np.float32)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    period = rng.uniform(6, 24)
    texture = np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / rng.uniform(6, 24))
    img += 18 * texture[..., None]
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    s = min(width, height)
    for k in range(int(rng.integers(2, 5))):
        main = k == 0
        r = rng.uniform(0.25, 0.4) * s if main else rng.uniform(0.05, 0.15) * s
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        kind = DEMO_CLASSES[cls] if main else DEMO_CLASSES[int(rng.integers(0, len(DEMO_CLASSES)))]
        color = _random_color(rng)
        box = (cx - r, cy - r * rng.uniform(0.6, 1.0), cx + r, cy + r * rng.uniform(0.6, 1.0))
        if kind == "ellipse":
            draw.ellipse(box, fill=color)
        elif kind == "rectangle":
            draw.rectangle(box, fill=color)
        elif kind == "triangle":
            a = rng.uniform(0, 2 * np.pi)
            pts = [(cx + r * np.cos(a + i * 2.094), cy + r * np.sin(a + i * 2.094)) for i in range(3)]
            draw.polygon(pts, fill=color)
        else:
            x0, y0, x1, y1 = box
            step = max(3, int(r / 5))
            for i, x in enumerate(range(int(x0), int(x1), step)):
                if i % 2 == 0:
                    draw.rectangle((x, y0, x + step - 1, y1), fill=color)
    arr = np.asarray(pil).astype(np.int16) + rng.normal(0, noise, (height, width, 3)).astype(np.int16)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _write_demo_image(job: tuple) -> None:
    root, i, width, height, seed, quality, noise = job
    rng = np.random.default_rng([seed, i])
    cls = i % len(DEMO_CLASSES)
    path = Path(root) / DEMO_CLASSES[cls] / f"{i:06d}.jpg"
    tmp = path.with_suffix(".tmp")
    render_image(rng, width, height, cls, noise).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def make_demo_dataset(
    root: str | os.PathLike,
    n_images: int = 512,
    size: int | tuple[int, int] = 96,
    seed: int = 0,
    quality: int = 90,
    noise: float = 4.0,
    processes: int | None = None,
) -> Path:
    """Write ``n_images`` JPEGs as ``root/<class>/<nnnnnn>.jpg`` (idempotent); returns ``root``.

    Args:
        root: output folder (created).
        n_images: how many images, spread evenly over :data:`DEMO_CLASSES`.
        size: side, or ``(width, height)`` (ImageNet-like: ``(500, 375)``).
        seed: generation seed.
        quality: JPEG quality.
        noise: grain std in grey levels; more grain, larger and slower-to-decode JPEGs
            (``noise=22`` at 500 x 375, quality 90 gives ~105 kB per file, about ImageNet's size).
        processes: write with this many processes (the result does not depend on it).
    """
    root = Path(root)
    width, height = (size, size) if isinstance(size, int) else size
    params = {"n_images": n_images, "width": width, "height": height, "seed": seed, "quality": quality}
    if noise != 4.0:
        params["noise"] = noise
    manifest = root / _MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == params:
                return root
        except ValueError:
            pass
        manifest.unlink()
    for c in DEMO_CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), i, width, height, seed, quality, noise) for i in range(n_images)]
    if processes is not None and processes > 1 and n_images >= 64:
        with concurrent.futures.ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_demo_image, jobs, chunksize=16))
    else:
        for job in jobs:
            _write_demo_image(job)
    manifest.write_text(json.dumps(params))
    return root


def png16_rgb(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG of ``rgb16`` ``(H, W, 3)`` uint16 (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_odd_files(folder: str | os.PathLike, size: tuple[int, int] = (64, 48), seed: int = 0) -> dict[str, Path]:
    """The bad-input matrix as files in ``folder``; returns ``{case: path}``.

    ``reference`` is the lossless RGB PNG every other file was made from. Readable odd formats: ``cmyk`` JPEG, ``gray`` JPEG, ``png16`` (16-bit grayscale PNG),
    ``png16rgb`` (16-bit RGB PNG), ``rgba`` PNG, ``palette`` PNG, ``gif`` (a GIF named ``.png``:
    PIL reads it, DALI does not). Unreadable: ``truncated`` JPEG (first half), ``corrupt``
    JPEG (Huffman tables overwritten), ``garbled`` JPEG (entropy data overwritten, end marker
    intact: PIL refuses it, DALI decodes it with a warning), ``empty`` (zero bytes), ``text``
    (not an image, ``.jpg`` name).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = render_image(rng, w, h, 0)

    def encode(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    good = encode(rgb, "JPEG", quality=90)
    # corrupt: noise in the Huffman tables (the header parses, no decoder can decode the scan);
    # garbled: noise in the entropy-coded data (libjpeg-turbo decodes it with a warning, PIL refuses)
    dht, sos = good.find(b"\xff\xc4"), good.find(b"\xff\xda")
    corrupt, garbled = bytearray(good), bytearray(good)
    corrupt[dht + 5 : dht + 30] = rng.integers(0, 255, 25, dtype=np.uint8).tobytes()
    noise = rng.integers(0, 256, len(good) - sos - 40, dtype=np.uint8).tobytes()
    garbled[sos + 20 : sos + 20 + len(noise)] = noise.replace(b"\xff\xd9", b"\xff\x01")
    gray16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    rgb16 = np.asarray(rgb, dtype=np.uint16) * 256 + rng.integers(0, 256, (h, w, 3), dtype=np.uint16)
    blobs = {
        "reference.png": encode(rgb, "PNG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "gray.jpg": encode(rgb.convert("L"), "JPEG", quality=95),
        "png16.png": encode(Image.fromarray(gray16), "PNG"),
        "png16rgb.png": png16_rgb(rgb16),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "gif.png": encode(rgb, "GIF"),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.jpg": bytes(corrupt),
        "garbled.jpg": bytes(garbled),
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n" * 8,
    }
    out = {}
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
        out[name.split(".")[0]] = folder / name
    return out
