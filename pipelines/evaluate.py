"""Rate-distortion evaluation of learned models against classic codecs, all coded for real.

    python pipelines/evaluate.py --images kodak/ --model q1.safetensors --model q2.safetensors \\
        --model mbt2018-mse-q3@champion [--codecs jpeg,webp,avif,jxl] \\
        [--reference platform/compresszoo/evaluate/compressai_kodak_mse.json] [--out DIR] [--mlflow]

--model takes a .safetensors checkpoint or a registry reference NAME[@ALIAS|:VERSION], optionally
prefixed with FAMILY= to name its curve (default: "<architecture>-<metric>"). Every number comes
from real files: model bitstreams (the .czoo container) and the classic codecs' files, decoded
and rounded to 8 bits before PSNR and MS-SSIM (MS-SSIM only on images over 160 px a side).
Curves are the Pareto fronts of their points; BD-rate and BD-PSNR use pchip (compresszoo.evaluate.rd).

Writes to --out: report.json (everything), rd_table.csv and report.md (mean RD points and BD
table), rd_images.csv (per image), rd_psnr.png and rd_ms_ssim.png (when MS-SSIM was measured).

Images: files with an image suffix in --images (not recursive). RGB is used as is; palette
images are converted to RGB; an alpha channel that is fully opaque is dropped; images with
transparency, grayscale or other modes (CMYK, ...) and unreadable files are skipped, named
in the report with the reason, and the run goes on with the rest.

MLflow: registry references are read from --tracking-uri, else MLFLOW_TRACKING_URI, else
./mlflow.db; --mlflow needs --tracking-uri or MLFLOW_TRACKING_URI. Checkpoints alone never
touch MLflow. Exit status: 0 done, 2 bad input, 1 another failure (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    import compresszoo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform"))

from compresszoo.evaluate import EvaluationError, UsageError  # noqa: E402
from compresszoo.evaluate.classic import CODECS  # noqa: E402
from compresszoo.evaluate.runner import Options, evaluate  # noqa: E402


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images to code")
    p.add_argument("--model", action="append", default=[], metavar="[FAMILY=]REF",
                   help="checkpoint (.safetensors) or registry NAME[@ALIAS|:VERSION]; repeat per model")
    p.add_argument("--codecs", default="auto",
                   help=f"classic codecs to run: comma list of {', '.join(CODECS)}; auto (default: all "
                        "available here) or none")
    p.add_argument("--reference", help="published results JSON to compare with (e.g. "
                                       "platform/compresszoo/evaluate/compressai_kodak_mse.json, the published zoo; meaningful on Kodak)")
    p.add_argument("--out", default="evaluation", help="output folder (default: ./evaluation)")
    p.add_argument("--mlflow", action="store_true", help="log the tables and plots to an MLflow run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI; for registry "
                                          "references only, else ./mlflow.db)")
    p.add_argument("--experiment", default="compresszoo-evaluate", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name (default: evaluate-<images folder name>)")
    a = p.parse_args(argv)
    if not a.model and a.codecs.strip().lower() == "none":
        p.error("nothing to evaluate: give --model and/or --codecs")
    return Options(images=Path(a.images), models=a.model, codecs=a.codecs,
                   reference=Path(a.reference) if a.reference else None, out=Path(a.out), mlflow=a.mlflow,
                   tracking_uri=a.tracking_uri, experiment=a.experiment, run_name=a.run_name)


def progress(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr)


def summary(report: dict, out: Path) -> list[str]:
    """The lines printed on stdout: images used and skipped, and BD-rate vs JPEG and the references."""
    images = report["images"]
    lines = [f"evaluated {len(images['evaluated'])} images, skipped {len(images['skipped'])}: "
             f"{', '.join(s['name'] for s in images['skipped']) or '-'}"]
    for b in report["bd"]:
        if b["anchor"] == "jpeg" or b["anchor_kind"] == "reference":
            value = f"{b['bd_rate_percent']:+.2f}%" if b["bd_rate_percent"] is not None else f"n/a ({b['error']})"
            lines.append(f"BD-rate {b['test']} vs {b['anchor']}: {value}")
    lines.append(f"wrote {out / 'report.json'}, {out / 'rd_table.csv'}, {out / 'report.md'}, {out / 'rd_psnr.png'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        report = evaluate(options, progress)
    except UsageError as e:
        progress(str(e))
        return 2
    except (EvaluationError, OSError) as e:
        progress(f"failed: {e}")
        return 1
    print("\n".join(summary(report, options.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
