"""The bitrate gate: compress held-out images for real, decode them, compare with estimates.

validate_bitrate() measures; apply_gate() turns the report into pass/fail with a reason.
A model reaches the registry only if apply_gate() passes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..models.loss import bpp_of, ms_ssim, psnr
from .image import _as_batch, decode_streams, encode_with_latents, pad


@dataclass(frozen=True)
class GateThresholds:
    #: largest allowed |mean real payload bpp - mean estimated bpp| / mean estimated bpp
    max_relative_gap: float = 0.03
    #: every decode must reproduce the encoder's latents bit for bit
    require_exact: bool = True
    #: the gap is measured on images whose sides are all at least this long
    min_side: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


def _one_image(model, x: torch.Tensor) -> dict:
    h, w = x.shape[-2:]
    pixels = h * w
    with torch.no_grad():
        # Estimate on the same padded input the coder sees, counted per original pixel.
        est = bpp_of(model.eval()(pad(x))["likelihoods"], pixels).item()
    t0 = time.perf_counter()
    try:
        data, y_hat = encode_with_latents(model, x)
    except (RuntimeError, ValueError) as e:
        return {"height": h, "width": w, "estimated_bpp": est, "error": f"encode failed: {e}",
                "exact": False}
    t1 = time.perf_counter()
    try:
        header, out = decode_streams(data, model)
        error = None
    except (RuntimeError, ValueError) as e:
        out, error = None, f"decode failed: {e}"
    t2 = time.perf_counter()
    payload = sum(map(sum, header.stream_lengths)) if out is not None else None
    row = {
        "height": h, "width": w, "estimated_bpp": est,
        "real_bpp": 8 * len(data) / pixels,
        "payload_bpp": 8 * payload / pixels if payload is not None else None,
        "encode_seconds": t1 - t0, "decode_seconds": t2 - t1,
        "exact": bool(out is not None and torch.equal(out["y_hat"], y_hat)),
        "error": error,
    }
    if out is not None:
        x_hat = out["x_hat"][..., :h, :w]
        row["relative_gap"] = (row["payload_bpp"] - est) / est if est > 0 else math.inf
        row["psnr"] = psnr(x_hat, x)
        row["ms_ssim"] = ms_ssim(x_hat, x).item() if min(h, w) > 160 else None
    return row


def validate_bitrate(model, images, thresholds: GateThresholds | None = None) -> dict:
    """Per-image and overall report (JSON-serializable), with the gate's verdict.

    images: an iterable of (3, H, W) tensors or one (N, 3, H, W) batch, floats in [0, 1].
    """
    thresholds = thresholds or GateThresholds()
    rows = []
    for image in images:
        x, _ = _as_batch(image)
        for i in range(x.shape[0]):
            rows.append(_one_image(model, x[i:i + 1]))
    report = {"images": rows, "thresholds": thresholds.to_dict()}
    report["overall"] = _summarize(rows, thresholds)
    report["passed"], report["reason"] = apply_gate(report, thresholds)
    return report


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _summarize(rows: list[dict], t: GateThresholds) -> dict:
    big = [r for r in rows if min(r["height"], r["width"]) >= t.min_side and r.get("payload_bpp") is not None]
    est, real = _mean([r["estimated_bpp"] for r in big]), _mean([r["payload_bpp"] for r in big])
    return {
        "num_images": len(rows),
        "num_gap_images": len(big),
        "all_exact": all(r["exact"] for r in rows) and bool(rows),
        "estimated_bpp": _mean([r["estimated_bpp"] for r in rows]),
        "real_bpp": _mean([r.get("real_bpp") for r in rows]),
        "payload_bpp": _mean([r.get("payload_bpp") for r in rows]),
        "gap_estimated_bpp": est,
        "gap_payload_bpp": real,
        # as for one image: an estimate of 0 bits makes any real payload an infinite gap
        "relative_gap": ((real - est) / est if est > 0 else math.inf) if big else None,
        "psnr": _mean([r.get("psnr") for r in rows]),
        "ms_ssim": _mean([r.get("ms_ssim") for r in rows]),
        "encode_seconds": sum(r.get("encode_seconds", 0.0) for r in rows),
        "decode_seconds": sum(r.get("decode_seconds", 0.0) for r in rows),
    }


def apply_gate(report: dict, thresholds: GateThresholds | None = None) -> tuple[bool, str]:
    """(passed, reason). Reasons name the first failed condition and the image behind it."""
    t = thresholds or GateThresholds()
    rows, overall = report["images"], report["overall"]
    if not rows:
        return False, "no validation images"
    for i, r in enumerate(rows):
        if r.get("error"):
            return False, f"image {i}: {r['error']}"
    if t.require_exact:
        for i, r in enumerate(rows):
            if not r["exact"]:
                return False, f"image {i}: decode not exact (decoded latents differ from the encoder's)"
    if overall["num_gap_images"] == 0:
        return False, f"no validation image of at least {t.min_side}x{t.min_side} to measure the bitrate gap"
    gap = overall["relative_gap"]
    if gap is None or abs(gap) > t.max_relative_gap:
        return False, (f"bitrate gap {gap:+.2%} between real payload bpp {overall['gap_payload_bpp']:.4f} and "
                       f"estimate {overall['gap_estimated_bpp']:.4f} exceeds {t.max_relative_gap:.0%}")
    exact = sum(bool(r["exact"]) for r in rows)
    decodes = f"all {len(rows)} decodes exact" if exact == len(rows) else f"{exact} of {len(rows)} decodes exact"
    return True, f"{decodes}; bitrate gap {gap:+.2%} within {t.max_relative_gap:.0%}"
