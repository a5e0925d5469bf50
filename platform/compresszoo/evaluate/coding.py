"""Coding pictures for real and measuring them: each model and each classic codec setting
codes every picture to a file, decodes it, rounds it to 8 bits, and the per-image bytes,
PSNR, MS-SSIM and timings are averaged into one RD point."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from . import rd
from .classic import ClassicCodec
from .images import Picture
from .learned import LoadedModel

MS_SSIM_MIN_SIDE = 161  # 5 scales of an 11-pixel window


def quality_metrics(ref: np.ndarray, dec: np.ndarray) -> dict:
    """PSNR (dB, 8-bit) and MS-SSIM of a decoded uint8 image against the original."""
    import torch

    from compresszoo.models import ms_ssim, psnr

    if dec.shape != ref.shape:
        raise ValueError(f"decoded image is {dec.shape}, original {ref.shape}")

    def tensor(a: np.ndarray) -> torch.Tensor:  # (1, 3, H, W) float32 holding 0..255 exactly
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()

    x, x_hat = tensor(ref), tensor(dec)
    out = {"psnr": psnr(x_hat, x, data_range=255.0), "ms_ssim": None}
    if min(ref.shape[:2]) >= MS_SSIM_MIN_SIDE:
        out["ms_ssim"] = float(ms_ssim(x_hat / 255.0, x / 255.0).item())
    return out


def run_codec(codec: ClassicCodec, q: int, pictures: list[Picture]) -> list[dict]:
    rows = []
    for p in pictures:
        t0 = time.perf_counter()
        data = codec.encode(p.rgb, q)
        t1 = time.perf_counter()
        dec = codec.decode(data)
        t2 = time.perf_counter()
        rows.append({"image": p.name, "bytes": len(data), "bpp": 8 * len(data) / p.pixels,
                     **quality_metrics(p.rgb, dec), "encode_seconds": t1 - t0, "decode_seconds": t2 - t1})
    return rows


def run_model(m: LoadedModel, pictures: list[Picture]) -> list[dict]:
    """Per-image rows; an image the model cannot code gets an "error" row instead of stopping the run."""
    import torch

    from compresszoo.codec import decode_image, encode_image, read_header

    rows = []
    for p in pictures:
        x = torch.from_numpy(p.rgb).permute(2, 0, 1).float() / 255.0
        try:
            t0 = time.perf_counter()
            data = encode_image(m.model, x)
            t1 = time.perf_counter()
            x_hat = decode_image(data, m.model)
            t2 = time.perf_counter()
        except (RuntimeError, ValueError) as e:
            rows.append({"image": p.name, "error": f"{type(e).__name__}: {e}"})
            continue
        dec = (x_hat.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
        payload = sum(map(sum, read_header(data).stream_lengths))
        rows.append({"image": p.name, "bytes": len(data), "bpp": 8 * len(data) / p.pixels,
                     "payload_bpp": 8 * payload / p.pixels, **quality_metrics(p.rgb, dec),
                     "encode_seconds": t1 - t0, "decode_seconds": t2 - t1})
    return rows


_MEANS = ("bpp", "payload_bpp", "psnr", "ms_ssim", "encode_seconds", "decode_seconds")


def summarize(curve: str, kind: str, setting: str, rows: list[dict], **extra) -> dict:
    """One RD point: per-image means (as CompressAI reports them) plus the rows themselves."""
    errors = [f"{r['image']}: {r['error']}" for r in rows if r.get("error")]
    point = {"curve": curve, "kind": kind, "setting": setting, **extra, "num_images": len(rows),
             "bpp": None, "payload_bpp": None, "psnr": None, "ms_ssim": None, "ms_ssim_db": None,
             "encode_seconds": None, "decode_seconds": None, "error": "; ".join(errors) or None,
             "images": rows}
    if errors or not rows:
        return point
    for key in _MEANS:  # a mean only where every image has the value (MS-SSIM needs 161 px a side)
        values = [r.get(key) for r in rows]
        point[key] = None if any(v is None for v in values) else float(np.mean(values))
    if point["ms_ssim"] is not None:
        point["ms_ssim_db"] = rd.ms_ssim_db(point["ms_ssim"])
    return point


def code_all(models: list[LoadedModel], codecs: list[ClassicCodec], pictures: list[Picture],
             progress: Callable[[str], None]) -> list[dict]:
    """The RD points of every model, then every codec at each of its qualities."""
    points = []
    for m in models:
        progress(f"{m.family} {m.setting} on {len(pictures)} images")
        points.append(summarize(m.family, "model", m.setting, run_model(m, pictures), model=m.ref))
    for c in codecs:
        progress(f"{c.name} at {len(c.qualities)} qualities on {len(pictures)} images")
        for q in c.qualities:
            points.append(summarize(c.name, "codec", f"quality={q}", run_codec(c, q, pictures), codec_quality=q))
    return points
