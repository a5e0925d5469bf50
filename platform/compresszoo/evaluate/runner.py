"""The evaluation in order: read the pictures, settle the MLflow server, load models and pick
codecs, code everything, compare the curves, write the report and log it to MLflow if asked.

MLflow is touched only when a registry model reference, --mlflow, --tracking-uri or
MLFLOW_TRACKING_URI asks for it: evaluating checkpoint files alone creates no ./mlflow.db.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import tracking
from . import EvaluationError, UsageError
from .classic import ClassicCodec, pick_codecs
from .coding import MS_SSIM_MIN_SIDE, code_all
from .compare import Comparison, compare, load_reference, reference_note
from .images import Folder, load_folder
from .learned import LoadedModel, load_models, parse_model_arg
from .report import SCHEMA, log_to_mlflow, write_outputs


@dataclass
class Options:
    """What to evaluate and where the results go (the command line's arguments)."""

    images: Path
    models: list[str] = field(default_factory=list)  # [FAMILY=]checkpoint or registry reference
    codecs: str = "auto"  # comma list, "auto" (every one usable here) or "none"
    reference: Path | None = None  # published results JSON
    out: Path = Path("evaluation")
    mlflow: bool = False  # log the report to an MLflow run
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI
    experiment: str = "compresszoo-evaluate"
    run_name: str | None = None  # default: evaluate-<images folder name>


def tracking_uri_for(options: Options) -> str | None:
    """The MLflow URI this evaluation needs, or None when it needs none.

    Registry references read the registry at compresszoo.tracking's URI (./mlflow.db by
    default); logging the report (--mlflow) needs a server named explicitly, so results never
    land in a database nobody asked for.
    """
    explicit = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if options.mlflow and not explicit:
        raise UsageError("--mlflow needs an explicit tracking server: pass --tracking-uri or set "
                         "MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db); MLflow's implicit default is not used")
    needs_registry = any(not parse_model_arg(v)[2] for v in options.models)
    return tracking.resolve_tracking_uri(explicit) if explicit or needs_registry else None


def _quiet(message: str) -> None:
    pass


def read_pictures(options: Options, progress: Callable[[str], None]) -> Folder:
    folder = load_folder(Path(options.images))
    for s in folder.skipped:
        progress(f"skipping {s['name']}: {s['reason']}")
    if not folder.pictures:
        raise UsageError(f"--images {folder.path}: no usable image ({len(folder.skipped)} skipped, "
                         f"{len(folder.ignored)} non-image files); give a folder of RGB PNG/JPEG images")
    return folder


def evaluate(options: Options, progress: Callable[[str], None] = _quiet) -> dict:
    """Run the evaluation and write its files to options.out; returns the report (as report.json,
    plus "mlflow_run_id" when logged). Bad input raises UsageError before any coding starts."""
    folder = read_pictures(options, progress)
    uri = tracking_uri_for(options)
    codecs, notes = pick_codecs(options.codecs)
    models = load_models(options.models, uri)
    reference, ref_meta = load_reference(Path(options.reference)) if options.reference else ({}, None)

    points = code_all(models, codecs, folder.pictures, progress)
    comparison = compare(points, reference)
    notes += _notes(folder, comparison, ref_meta, progress)
    report = build_report(folder, models, codecs, ref_meta, points, comparison, notes)

    out = Path(options.out)
    kodak = folder.looks_like_kodak()
    footnote = f"{len(folder.pictures)} images from {folder.path.name}" + (
        "" if kodak or not reference else "; reference curves are on Kodak")
    write_outputs(report, out, comparison, footnote)
    if options.mlflow:
        report["mlflow_run_id"] = _log(report, out, uri, options, folder)
        progress(f"logged to MLflow run {report['mlflow_run_id']} at {uri}")
    return report


def _notes(folder: Folder, comparison: Comparison, ref_meta: dict | None,
           progress: Callable[[str], None]) -> list[str]:
    """What a reader needs to know to read the numbers right; sets ref_meta's verdict on Kodak."""
    notes = []
    if folder.ignored:
        notes.append(f"not image files, ignored: {', '.join(folder.ignored)}")
    notes += comparison.notes()
    if ref_meta is not None:
        kodak = folder.looks_like_kodak()
        ref_meta["comparable"] = kodak
        ref_meta["note"] = reference_note(ref_meta, len(folder.pictures), kodak)
        notes.append(ref_meta["note"])
        if not kodak:
            progress(f"warning: {ref_meta['note']}")
    if any(min(p.rgb.shape[:2]) < MS_SSIM_MIN_SIDE for p in folder.pictures):
        notes.append(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} px a side; means are given only "
                     "where every image has it")
    notes.append("bpp counts whole files (model: .czoo container with its header; codecs: the image file); "
                 "PSNR and MS-SSIM are on the decoded image rounded to 8 bits, averaged over images.")
    return notes


def build_report(folder: Folder, models: list[LoadedModel], codecs: list[ClassicCodec], ref_meta: dict | None,
                 points: list[dict], comparison: Comparison, notes: list[str]) -> dict:
    """The report.json document (schema compresszoo.evaluate/1)."""
    evaluated = [{"name": p.name, "height": p.rgb.shape[0], "width": p.rgb.shape[1], "note": p.note}
                 for p in folder.pictures]
    return {
        "schema": SCHEMA,
        "images": {"dir": str(folder.path), "evaluated": evaluated, "skipped": folder.skipped,
                   "ignored": folder.ignored, "looks_like_kodak": folder.looks_like_kodak()},
        "models": [m.describe() for m in models],
        "codecs": {c.name: c.describe() for c in codecs},
        "reference": ref_meta,
        "points": points,
        "curves": comparison.curves_json(),
        "bd": comparison.bd,
        "notes": notes,
    }


def _log(report: dict, out: Path, uri: str, options: Options, folder: Folder) -> str:
    try:
        return log_to_mlflow(report, out, uri, options.experiment, options.run_name or f"evaluate-{folder.path.name}")
    except Exception as e:  # noqa: BLE001 - MLflow raises many types for a store that is down or refuses
        first = (str(e).splitlines() or [""])[0][:300]
        raise EvaluationError(f"logging to MLflow at {uri} failed ({type(e).__name__}: {first}); "
                              f"the report files are in {out}") from e
