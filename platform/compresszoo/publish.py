"""After training: update() the tables, run the bitrate gate, register the model if it passes.

The gate's report goes to the MLflow run either way, so a rejected model says why; a
registered version also carries a plot of the gate's measurements (rd_plot.png).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from .codec.gate import GateThresholds, validate_bitrate
from .config import TrainConfig
from .data.manifest import Manifest, manifest_uri
from .models.io import WEIGHTS_FILE, load_weights
from .tracking import MlflowLogger


def manifest_sha(data_uri: str) -> str:
    """Identity of the dataset: the sha256 of its manifest's bytes."""
    import hashlib

    from . import storage

    return hashlib.sha256(storage.read_bytes(manifest_uri(Manifest.load(data_uri).root))).hexdigest()[:16]


def held_out_images(cfg: TrainConfig) -> list:
    """The gate's images: center crops of the test split (never trained on)."""
    from .data.reader import validation_batches

    Manifest.load(cfg.data)  # a clear error if the manifest is gone
    images = []
    for batch in validation_batches(cfg.data, crop=cfg.val_crop, batch_size=4, limit=cfg.gate_images,
                                    task_cpus=cfg.data_cpus):
        images.extend(batch)
    return images


def measure_and_log(cfg: TrainConfig, checkpoint_dir: str, run_id: str, *, steps: int,
                    images: list | None = None):
    """The one gate path: load the checkpoint's weights, build the tables, compress the
    held-out images for real (default: held_out_images(cfg)) and log the report, the gate_*
    metrics and the verdict to the run. Returns (model, report); the run stays open."""
    model = load_weights(Path(checkpoint_dir) / WEIGHTS_FILE)
    model.update(force=True)
    thresholds = GateThresholds(max_relative_gap=cfg.gate_max_gap, min_side=cfg.gate_min_side)
    report = validate_bitrate(model, images if images is not None else held_out_images(cfg), thresholds)
    logger = MlflowLogger(cfg.tracking_uri, run_id)
    logger.log_dict(report, "bitrate_report.json")
    logger.log_metrics({f"gate_{k}": v for k, v in report["overall"].items() if isinstance(v, (int, float))}, steps)
    logger.set_tags({"gate.passed": report["passed"], "gate.reason": report["reason"]})
    return model, report


RD_PLOT, RD_POSITION = "rd_plot.png", "rd_position.json"


def rd_position(spec, report: dict) -> dict:
    """The model's gate measurement against the published zoo at its quality (for the model
    card; evaluate.compare.rd_position says when that comparison means something), with
    its sentence under "text"."""
    from .evaluate.compare import rd_position as position
    from .evaluate.compare import rd_position_text

    overall = report["overall"]
    pos = position(architecture=spec.architecture, metric=spec.metric, quality=spec.quality, N=spec.N,
                   M=spec.M, payload_bpp=overall.get("payload_bpp"), psnr=overall.get("psnr"),
                   image_shapes=[(r["height"], r["width"]) for r in report.get("images", [])])
    return {**pos, "text": rd_position_text(pos)}


def rd_plot(report: dict, path: Path, *, title: str = "") -> Path | None:
    """A PNG of the gate's rate-distortion measurements (each held-out image and their mean,
    real bpp against PSNR) for the version's model card; None when nothing was measured."""
    from .evaluate.rd import plot_rd_curves

    rows = [r for r in report.get("images", []) if r.get("psnr") is not None and r.get("real_bpp") is not None]
    if not rows:
        return None
    overall = report["overall"]
    return plot_rd_curves([], path, title=f"{title}: gate measurements", scatter=[
        ("held-out images", [r["real_bpp"] for r in rows], [r["psnr"] for r in rows]),
        ("mean", [overall["real_bpp"]], [overall["psnr"]])],
        footnote="real bpp: whole .czoo file bits per pixel; PSNR of the decoded image")


def gate_and_register(cfg: TrainConfig, checkpoint_dir: str, run_id: str, *, steps: int,
                      val_loss: float, on_register: Callable[[], None] | None = None) -> dict:
    """Returns a summary row: gate verdict, bitrates, PSNR and the registry version (or None).
    on_register: called once the gate has passed, before the upload (a progress phase)."""
    from . import registry_client

    model, report = measure_and_log(cfg, checkpoint_dir, run_id, steps=steps)
    overall = report["overall"]
    logger = MlflowLogger(cfg.tracking_uri, run_id)
    spec = cfg.spec()
    row = {"architecture": spec.architecture, "quality": spec.quality, "lambda": spec.lmbda,
           "N": spec.N, "M": spec.M, "steps": steps, "estimated_bpp": overall["estimated_bpp"],
           "payload_bpp": overall["payload_bpp"], "relative_gap": overall["relative_gap"],
           # the pair the gap is computed from (images with both sides >= min_side)
           "gate_payload_bpp": overall["gap_payload_bpp"], "gate_estimated_bpp": overall["gap_estimated_bpp"],
           "max_relative_gap": report["thresholds"]["max_relative_gap"],
           "real_bpp": overall["real_bpp"], "psnr": overall["psnr"], "gate": report["passed"],
           "reason": report["reason"], "name": spec.registry_name, "version": None}
    if report["passed"]:
        if on_register is not None:
            on_register()
        position = rd_position(spec, report)
        rd_point = {"bpp": overall["real_bpp"], "payload_bpp": overall["payload_bpp"],
                    "psnr": overall["psnr"], "ms_ssim": overall["ms_ssim"], "val_loss": val_loss}
        with tempfile.TemporaryDirectory(prefix="compresszoo-card-") as tmp:
            plot = rd_plot(report, Path(tmp) / RD_PLOT, title=spec.registry_name)
            (Path(tmp) / RD_POSITION).write_text(json.dumps(position, indent=2))
            version, champion = registry_client.register(
                model, name=spec.registry_name, run_id=run_id, config=cfg.to_dict(), report=report,
                rd_point=rd_point, val_loss=val_loss, tracking_uri=cfg.tracking_uri,
                tags={"config_hash": cfg.config_hash(), "manifest_sha": manifest_sha(cfg.data),
                      "run_name": cfg.run_name(), "steps": steps},
                attachments={RD_POSITION: Path(tmp) / RD_POSITION, **({RD_PLOT: plot} if plot else {})},
                rd_position=position)
        row.update(version=version, champion=champion)
        logger.set_tags({"registry.name": spec.registry_name, "registry.version": version})
    logger.close()
    return row


def _first(row: dict, *keys: str):
    return next((row[k] for k in keys if row.get(k) is not None), None)


def summary_table(rows: list[dict]) -> str:
    """The zoo job's final table: per model the pair the gate compares (payload bpp: the
    entropy-coded bitstreams; estimated bpp: the likelihoods), their gap and the allowed gap,
    the verdict, then the whole file's bpp and PSNR."""
    head = ("| arch | q | lambda | N,M | steps | payload bpp | est. bpp | gap | allowed | gate | "
            "file bpp | PSNR | version |")
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        gate = "pass" if r.get("gate") else f"FAIL: {r.get('reason', '')}"
        if r.get("gate") and r.get("relative_gap") is None and r.get("reason"):
            gate += f" ({r['reason']})"  # not gated in this job: already registered
        lines.append(f"| {r['architecture']} | {r['quality']} | {r['lambda']:g} | {r['N']},{r['M']} | "
                     f"{r.get('steps') or '-'} | {fmt(_first(r, 'gate_payload_bpp', 'payload_bpp'), '.4f')} | "
                     f"{fmt(_first(r, 'gate_estimated_bpp', 'estimated_bpp'), '.4f')} | "
                     f"{fmt(r.get('relative_gap'), '+.2%')} | "
                     f"{fmt(r.get('max_relative_gap'), '.0%')} | {gate} | {fmt(r.get('real_bpp'), '.4f')} | "
                     f"{fmt(r.get('psnr'), '.2f')} | {r.get('version') or '-'} |")
    lines += ["", "payload bpp: the entropy-coded bitstreams; est. bpp: the model's likelihoods; gap: "
              "(payload - est.) / est. on the held-out images the gate measures; the gate passes "
              "|gap| <= allowed. file bpp: the whole .czoo file, header included."]
    return "\n".join(lines)
