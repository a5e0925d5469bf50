"""From RD points to comparisons: each curve as the Pareto front of its points, Bjontegaard
rows (models vs codecs, codecs vs JPEG, models vs published references), and the notes that
say what a comparison means (dominated points, missing curves, references on other images)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from . import UsageError, rd


def usable(p: dict, rate: str, quality: str) -> bool:
    """A point that can go on a curve: no error, finite rate and quality."""
    return p["error"] is None and all(isinstance(p.get(k), float) and math.isfinite(p[k]) for k in (rate, quality))


def build_curves(points: list[dict], rate: str, quality: str) -> tuple[dict, dict]:
    """({label: RDCurve}, {label: {"front", "dominated", "error"}}) over each curve's points.

    A curve is the Pareto front of its usable points: a quality setting that costs more bits for
    less quality than another is listed as dominated instead of breaking the interpolation.
    """
    curves, info = {}, {}
    for label in dict.fromkeys(p["curve"] for p in points):
        mine = [p for p in points if p["curve"] == label and usable(p, rate, quality)]
        front = rd.pareto_front(mine, rate, quality)
        dominated = [p["setting"] for p in mine if not any(p is f for f in front)]
        info[label] = {"front": {p["setting"] for p in front}, "dominated": dominated, "error": None}
        try:
            curves[label] = rd.RDCurve(label, [p[rate] for p in front], [p[quality] for p in front])
        except ValueError as e:
            info[label]["error"] = str(e)
    return curves, info


def load_reference(path: Path) -> tuple[dict, dict]:
    """({label: RDCurve}, meta) from a published-results JSON (compressai_kodak_mse.json layout)."""
    try:
        doc = json.loads(Path(path).read_text())
        results = doc["results"]
        metric = doc.get("metric", "mse")
        curves = {f"reference:{arch}-{metric}": rd.RDCurve(f"reference:{arch}-{metric}", r["bpp"], r["psnr"])
                  for arch, r in results.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--reference {path}: not a readable reference file ({type(e).__name__}: {e}); "
                         'expected {"dataset", "metric", "results": {arch: {"bpp": [...], "psnr": [...]}}}') from None
    meta = {k: doc.get(k) for k in ("dataset", "metric", "source")}
    return curves, {"path": str(path), **meta}


def bd_rows(tests: dict, anchors: dict, kinds: dict, ms_tests: dict, ms_anchors: dict,
            rate_measure: str = "bpp") -> list[dict]:
    """BD of every test curve against every anchor (PSNR, and MS-SSIM where both have it)."""
    rows = []
    for t_label, t in tests.items():
        for a_label, a in anchors.items():
            if t_label == a_label:
                continue
            s = rd.bd_summary(a, t)
            row = {"test": t_label, "test_kind": kinds[t_label], "anchor": a_label, "anchor_kind": kinds[a_label],
                   "rate_measure": rate_measure, "bd_rate_percent": s["bd_rate_percent"], "bd_psnr_db": s["bd_quality_db"],
                   "psnr_overlap_db": s["quality_overlap_db"], "error": s["error"],
                   "bd_rate_ms_ssim_percent": None, "bd_ms_ssim_db": None}
            if t_label in ms_tests and a_label in ms_anchors:
                m = rd.bd_summary(ms_anchors[a_label], ms_tests[t_label])
                row["bd_rate_ms_ssim_percent"], row["bd_ms_ssim_db"] = m["bd_rate_percent"], m["bd_quality_db"]
            rows.append(row)
    return rows


@dataclass
class Comparison:
    """The curves built from the points and the BD rows between them."""

    kinds: dict[str, str]  # curve label -> "model", "codec" or "reference"
    curves: dict[str, rd.RDCurve]  # bpp vs PSNR, measured curves only
    info: dict[str, dict]  # per measured curve: front, dominated settings, error
    ms_curves: dict[str, rd.RDCurve]  # bpp vs MS-SSIM (dB)
    reference: dict[str, rd.RDCurve]
    bd: list[dict]

    def curves_json(self) -> dict:
        measured = {label: {"kind": self.kinds[label], "bpp": list(c.rate), "psnr": list(c.quality),
                            "dominated": self.info[label]["dominated"]} for label, c in self.curves.items()}
        published = {label: {"kind": "reference", "bpp": list(c.rate), "psnr": list(c.quality), "dominated": []}
                     for label, c in self.reference.items()}
        return measured | published

    def notes(self) -> list[str]:
        out = []
        for label, info in self.info.items():
            if info["error"]:
                out.append(f"no RD curve for {label}: {info['error']}")
            elif info["dominated"]:
                out.append(f"{label}: dominated points left off the curve: {', '.join(info['dominated'])}")
        return out


def compare(points: list[dict], reference: dict) -> Comparison:
    """Curves of the points and BD rows; marks each point's "on_front"."""
    kinds = {p["curve"]: p["kind"] for p in points} | {k: "reference" for k in reference}
    curves, info = build_curves(points, "bpp", "psnr")
    ms_curves, _ = build_curves(points, "bpp", "ms_ssim_db")
    for p in points:
        p["on_front"] = p["curve"] in curves and p["setting"] in info[p["curve"]]["front"]

    model_curves = {k: v for k, v in curves.items() if kinds[k] == "model"}
    codec_curves = {k: v for k, v in curves.items() if kinds[k] == "codec"}
    bd = bd_rows({**model_curves, **codec_curves}, codec_curves, kinds, ms_curves, ms_curves)
    bd = [b for b in bd if not (b["test_kind"] == "codec" and b["anchor"] != "jpeg")]  # codecs: vs JPEG only
    if reference:
        # The reference counts the bitstreams only (CompressAI's bpp), so compare with the payload.
        payload_curves, _ = build_curves([p for p in points if p["kind"] == "model"], "payload_bpp", "psnr")
        bd += bd_rows(payload_curves, reference, kinds, {}, {}, rate_measure="payload_bpp")
    return Comparison(kinds, curves, info, ms_curves, reference, bd)


def reference_note(meta: dict, num_images: int, kodak: bool) -> str:
    """What BD against a published reference means for these images."""
    return (f"BD against the reference uses published results on {meta.get('dataset') or 'its dataset'} "
            "with payload bpp (bitstreams only, as CompressAI counts). "
            + (f"These {num_images} images look like Kodak, so the comparison is like for like."
               if kodak else
               f"These {num_images} images are not Kodak (24 images of 768x512), so those numbers compare "
               "different images: indicative only. Run on Kodak for a meaningful comparison."))


#: the published CompressAI zoo's RD points on Kodak (MSE models), shipped with the package
PUBLISHED_ZOO = Path(__file__).with_name("compressai_kodak_mse.json")


def rd_position(*, architecture: str, metric: str, quality: int, N: int, M: int, payload_bpp: float | None,
                psnr: float | None, image_shapes: list[tuple[int, int]], reference: Path = PUBLISHED_ZOO) -> dict:
    """Where one model's measured point sits against the published zoo at its quality.

    Comparable only when all hold: a published curve for this architecture and metric, the
    zoo's own channel counts (N, M) at this quality, and the 24 Kodak images as the measured
    set; then the PSNR difference at equal bpp and the bpp difference at equal PSNR (pchip in
    log-rate on the published curve, payload bpp as CompressAI counts it). Otherwise the
    published point is given for orientation and `not_comparable` says why."""
    from ..models.registry import ARCHITECTURES
    from .images import KODAK_SHAPES

    doc = json.loads(Path(reference).read_text())
    out = {"reference": f"CompressAI {architecture} ({doc.get('metric')}) on {doc.get('dataset')}",
           "source": doc.get("source"), "quality": quality, "published": None,
           "measured": {"payload_bpp": payload_bpp, "psnr": psnr, "images": len(image_shapes)},
           "psnr_delta_db_at_equal_bpp": None, "bpp_delta_percent_at_equal_psnr": None,
           "comparable": False, "not_comparable": []}
    why = out["not_comparable"]
    series = doc.get("results", {}).get(architecture) if doc.get("metric") == metric else None
    if series is None:
        why.append(f"no published {metric} curve for {architecture} (the reference holds "
                   f"{doc.get('metric')} results for {', '.join(doc.get('results', {}))})")
    elif quality in series["quality"]:
        i = series["quality"].index(quality)
        out["published"] = {"bpp": series["bpp"][i], "psnr": series["psnr"][i]}
    arch = ARCHITECTURES.get(architecture)
    if arch is not None and 1 <= quality <= len(arch.channels) and tuple(arch.channels[quality - 1]) != (N, M):
        zn, zm = arch.channels[quality - 1]
        why.append(f"N={N}, M={M} is not the zoo's N={zn}, M={zm} at quality {quality}")
    if not (len(image_shapes) == 24 and all(tuple(s) in KODAK_SHAPES for s in image_shapes)):
        why.append(f"measured on {len(image_shapes)} held-out image(s) of the training data, not the 24 "
                   "Kodak images the published curve uses")
    if payload_bpp is None or psnr is None:
        why.append("no measured bpp and PSNR")
    if why or series is None:
        return out
    curve = rd.RDCurve(f"reference:{architecture}-{metric}", series["bpp"], series["psnr"])
    out["comparable"] = True
    try:
        out["psnr_delta_db_at_equal_bpp"] = psnr - rd.quality_at_rate(curve, payload_bpp)
    except ValueError:
        pass  # outside the published bpp range: pchip does not extrapolate
    try:
        out["bpp_delta_percent_at_equal_psnr"] = 100 * (payload_bpp / rd.rate_at_quality(curve, psnr) - 1)
    except ValueError:
        pass
    return out


def rd_position_text(pos: dict) -> str:
    """One or two sentences for a model card."""
    pub, m = pos["published"], pos["measured"]
    here = (f"this model: {m['payload_bpp']:.4f} bpp, {m['psnr']:.2f} dB"
            if m["payload_bpp"] is not None and m["psnr"] is not None else "this model: not measured")
    ref = (f"the published point at quality {pos['quality']} is {pub['bpp']:.4f} bpp, {pub['psnr']:.2f} dB"
           if pub else f"no published point at quality {pos['quality']}")
    if not pos["comparable"]:
        return (f"Not comparable with the published zoo ({pos['reference']}): "
                + "; ".join(pos["not_comparable"]) + f". For orientation only: {ref}; {here}.")
    parts = []
    if pos["psnr_delta_db_at_equal_bpp"] is not None:
        parts.append(f"{pos['psnr_delta_db_at_equal_bpp']:+.2f} dB at equal bpp")
    if pos["bpp_delta_percent_at_equal_psnr"] is not None:
        parts.append(f"{pos['bpp_delta_percent_at_equal_psnr']:+.1f}% bits at equal PSNR")
    verdict = ", ".join(parts) if parts else "outside the published curve's range (no interpolation)"
    return f"Against {pos['reference']}: {verdict}; {ref}; {here} (payload bpp, as CompressAI counts)."
