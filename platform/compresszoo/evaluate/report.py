"""The evaluation's outputs: report.json (everything), rd_table.csv and rd_images.csv, report.md,
the RD plots, and an MLflow run holding them. Files are written atomically (storage.write_bytes)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import time
from pathlib import Path

from .. import storage
from . import rd
from .compare import Comparison, usable

SCHEMA = "compresszoo.evaluate/1"
REPORT_JSON, POINTS_CSV, IMAGES_CSV, REPORT_MD = "report.json", "rd_table.csv", "rd_images.csv", "report.md"
PSNR_PLOT, MS_SSIM_PLOT = "rd_psnr.png", "rd_ms_ssim.png"
POINT_COLUMNS = ("curve", "kind", "setting", "num_images", "bpp", "payload_bpp", "psnr", "ms_ssim",
                 "encode_seconds", "decode_seconds", "on_front", "error")
IMAGE_COLUMNS = ("curve", "setting", "image", "bytes", "bpp", "payload_bpp", "psnr", "ms_ssim",
                 "encode_seconds", "decode_seconds", "error")
STYLES = {"model": {"linestyle": "-", "marker": "o"}, "codec": {"linestyle": "--", "marker": "s"},
          "reference": {"linestyle": ":", "marker": "^"}}


# ---------------------------------------------------------------------------- files


def clean(obj):
    """JSON-safe: non-finite floats become None (JSON has no Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def _write_text(path: Path, text: str) -> None:
    storage.write_bytes(path, text.encode())


def write_csv(path: Path, rows: list[dict], columns) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    _write_text(path, buf.getvalue())


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    imgs = report["images"]
    lines = [f"# Rate-distortion evaluation: {imgs['dir']}", "",
             f"{len(imgs['evaluated'])} images evaluated, {len(imgs['skipped'])} skipped.", ""]
    if imgs["skipped"]:
        lines += ["Skipped files:", ""] + [f"- `{s['name']}`: {s['reason']}" for s in imgs["skipped"]] + [""]
    lines += ["## RD points (means over images)", "",
              "| curve | setting | bpp | PSNR (dB) | MS-SSIM | encode ms | decode ms | on front |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in report["points"]:
        lines.append(f"| {p['curve']} | {p['setting']} | {_fmt(p['bpp'])} | {_fmt(p['psnr'], 2)} | "
                     f"{_fmt(p['ms_ssim'])} | {_ms(p['encode_seconds'])} | {_ms(p['decode_seconds'])} | "
                     f"{'yes' if p['on_front'] else 'no'}{' (error: ' + p['error'] + ')' if p['error'] else ''} |")
    lines += ["", "## Bjontegaard deltas (pchip; negative BD-rate = fewer bits than the anchor)", "",
              "| test | anchor | BD-rate (%) | BD-PSNR (dB) | PSNR overlap (dB) | BD-rate MS-SSIM (%) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for b in report["bd"]:
        overlap = "-" if not b["psnr_overlap_db"] else "{:.2f}-{:.2f}".format(*b["psnr_overlap_db"])
        rate = _fmt(b["bd_rate_percent"], 2) if b["error"] is None else f"n/a ({b['error'].split(';')[0]})"
        lines.append(f"| {b['test']} | {b['anchor']} | {rate} | {_fmt(b['bd_psnr_db'], 3)} | {overlap} | "
                     f"{_fmt(b['bd_rate_ms_ssim_percent'], 2)} |")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(path: Path, curves: dict, kinds: dict, points: list[dict], quality: str, ylabel: str, title: str,
         footnote: str) -> None:
    loose = []  # curves with fewer than 2 usable points still show up, as dots
    for label in dict.fromkeys(p["curve"] for p in points):
        if label not in curves:
            mine = [p for p in points if p["curve"] == label and usable(p, "bpp", quality)]
            if mine:
                loose.append((label, [p["bpp"] for p in mine], [p[quality] for p in mine]))
    rd.plot_rd_curves(list(curves.values()), path, title=title, ylabel=ylabel,
                      styles={k: STYLES[kinds[k]] for k in curves}, scatter=loose, footnote=footnote)


def write_outputs(report: dict, out: Path, comparison: Comparison, footnote: str) -> None:
    """All files of the report into `out`."""
    points = report["points"]
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / REPORT_JSON, json.dumps(clean(report), indent=1))
    write_csv(out / POINTS_CSV, points, POINT_COLUMNS)
    write_csv(out / IMAGES_CSV, [{"curve": p["curve"], "setting": p["setting"], **r}
                                 for p in points for r in p["images"]], IMAGE_COLUMNS)
    _write_text(out / REPORT_MD, markdown(report))
    c = comparison
    plot(out / PSNR_PLOT, {**c.curves, **c.reference}, c.kinds, points, "psnr", "PSNR (dB, RGB)",
         "Rate-distortion: PSNR", footnote)
    if c.ms_curves:
        plot(out / MS_SSIM_PLOT, c.ms_curves, c.kinds, points, "ms_ssim_db", "MS-SSIM (dB)",
             "Rate-distortion: MS-SSIM", footnote)


# ---------------------------------------------------------------------------- MLflow


def _metric_name(*parts: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", p) for p in parts)


def _metrics(report: dict, ts: int) -> list:
    from mlflow.entities import Metric

    bd = report["bd"]
    metrics = [Metric(_metric_name("bd_rate", b["test"], "vs", b["anchor"]), b["bd_rate_percent"], ts, 0)
               for b in bd if b["bd_rate_percent"] is not None]
    metrics += [Metric(_metric_name("bd_psnr", b["test"], "vs", b["anchor"]), b["bd_psnr_db"], ts, 0)
                for b in bd if b["bd_psnr_db"] is not None]
    for p in report["points"]:
        for key in ("bpp", "psnr", "ms_ssim"):
            if p[key] is not None and math.isfinite(p[key]):
                metrics.append(Metric(_metric_name(p["curve"], p["setting"], key), p[key], ts, 0))
    return metrics


def log_to_mlflow(report: dict, out: Path, uri: str, experiment: str, run_name: str) -> str:
    """A new finished run in `experiment` with the report's parameters, BD and RD metrics, and
    every file in `out` as artifacts; returns its id (the run is marked FAILED on an error)."""
    from mlflow.entities import Param

    from .. import tracking

    client = tracking.client(uri)
    # Same artifact-root convention as training runs (compresszoo.tracking).
    exp_id = tracking.experiment_id(client, experiment, os.environ.get("COMPRESSZOO_MLFLOW_ARTIFACTS") or None)
    run_id = client.create_run(exp_id, run_name=run_name, tags={"compresszoo.job": "evaluate"}).info.run_id
    try:
        images = report["images"]
        params = {"images_dir": images["dir"], "num_images": len(images["evaluated"]),
                  "num_skipped": len(images["skipped"]), "models": ",".join(m["ref"] for m in report["models"]),
                  "codecs": ",".join(report["codecs"]) or "none"}
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        metrics = _metrics(report, int(time.time() * 1000))
        for i in range(0, len(metrics), 500):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=metrics[i:i + 500])
        client.log_artifacts(run_id, str(out))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id
