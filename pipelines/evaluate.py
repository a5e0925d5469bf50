"""Rate-distortion evaluation of learned models against classic codecs, all coded for real.

    python pipelines/evaluate.py --images kodak/ --model q1.safetensors --model q2.safetensors \
        --model mbt2018-mse-q3@champion [--codecs jpeg,webp,avif,jxl] \
        [--reference ../shared/reference/compressai_kodak_mse.json] [--out DIR] [--mlflow]

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
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

try:
    import compresszoo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform"))

import numpy as np  # noqa: E402

from compresszoo.evaluate import rd  # noqa: E402

SCHEMA = "compresszoo.evaluate/1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pnm", ".avif"}
MS_SSIM_MIN_SIDE = 161  # 5 scales of an 11-pixel window
KODAK_SHAPES = {(512, 768), (768, 512)}


class UsageError(ValueError):
    """Bad command-line input; main() prints it as one line and exits with status 2."""


# ---------------------------------------------------------------------------- images


@dataclass
class Picture:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8
    note: str = ""

    @property
    def pixels(self) -> int:
        return int(self.rgb.shape[0] * self.rgb.shape[1])


def read_rgb(path: Path) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 and a note on any conversion; ValueError saying why it is unusable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                note = "palette image converted to RGB"
            else:
                note = ""
            if im.mode == "RGBA":
                lo, _ = im.getchannel("A").getextrema()
                if lo < 255:
                    raise ValueError(f"has transparency (mode {mode}); the codecs compared here code "
                                     "RGB only: flatten it onto a background to evaluate it")
                im, note = im.convert("RGB"), "fully opaque alpha channel dropped"
            if im.mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"grayscale (mode {mode}); the models code 3-channel RGB: convert it "
                                 "to RGB to evaluate it")
            if im.mode != "RGB":
                raise ValueError(f"mode {mode}, not RGB; convert it to RGB to evaluate it")
            return np.array(im, dtype=np.uint8), note
    except ValueError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, struct.error, ... on bad files
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None


def load_folder(folder: Path) -> tuple[list[Picture], list[dict], list[str]]:
    """(usable images, skipped files with reasons, ignored non-image files), sorted by name."""
    if not folder.is_dir():
        raise UsageError(f"--images {folder}: not a folder; give a folder of PNG/JPEG images")
    pictures, skipped, ignored = [], [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append(path.name)
            continue
        try:
            rgb, note = read_rgb(path)
        except ValueError as e:
            skipped.append({"name": path.name, "reason": str(e)})
            continue
        pictures.append(Picture(path.name, rgb, note))
    return pictures, skipped, ignored


def looks_like_kodak(pictures: list[Picture]) -> bool:
    return len(pictures) == 24 and all(p.rgb.shape[:2] in KODAK_SHAPES for p in pictures)


# ---------------------------------------------------------------------------- metrics


def quality_metrics(ref: np.ndarray, dec: np.ndarray) -> dict:
    """PSNR (dB, 8-bit) and MS-SSIM of a decoded uint8 image against the original."""
    if dec.shape != ref.shape:
        raise ValueError(f"decoded image is {dec.shape}, original {ref.shape}")
    mse = float(np.mean((ref.astype(np.float64) - dec.astype(np.float64)) ** 2))
    out = {"psnr": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse), "ms_ssim": None}
    if min(ref.shape[:2]) >= MS_SSIM_MIN_SIDE:
        import torch

        from compresszoo.models import ms_ssim

        def t(a):
            return torch.tensor(a, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0

        out["ms_ssim"] = float(ms_ssim(t(dec), t(ref)).item())
    return out


# ---------------------------------------------------------------------------- classic codecs


@dataclass(frozen=True)
class ClassicCodec:
    name: str
    qualities: tuple[int, ...]
    encode: Callable[[np.ndarray, int], bytes]
    decode: Callable[[bytes], np.ndarray]
    #: None when usable here, else what is missing and how to get it
    missing: Callable[[], str | None]
    settings: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"qualities": list(self.qualities), **self.settings, "library": self.library()}

    def library(self) -> str:
        if self.name == "jxl":
            import imagecodecs

            return f"imagecodecs {imagecodecs.__version__} (libjxl)"
        import PIL

        return f"Pillow {PIL.__version__}"


def _pillow_codec(name: str, fmt: str, feature: str, qualities: tuple[int, ...], **options) -> ClassicCodec:
    def encode(rgb: np.ndarray, q: int) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt, quality=q, **options)
        return buf.getvalue()

    def decode(data: bytes) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    def missing() -> str | None:
        from PIL import __version__, features

        try:
            ok = features.check(feature)
        except ValueError:  # a Pillow that does not know the feature at all
            ok = False
        return None if ok else (f"this Pillow ({__version__}) has no {fmt} encoder; "
                                f"install a Pillow built with {feature} (AVIF: Pillow >= 11.3)")

    return ClassicCodec(name, qualities, encode, decode, missing, {"format": fmt, **options})


def _jxl_codec(qualities: tuple[int, ...]) -> ClassicCodec:
    def encode(rgb: np.ndarray, q: int) -> bytes:
        import imagecodecs

        return bytes(imagecodecs.jpegxl_encode(np.ascontiguousarray(rgb), level=q))

    def decode(data: bytes) -> np.ndarray:
        import imagecodecs

        return np.asarray(imagecodecs.jpegxl_decode(data))

    def missing() -> str | None:
        try:
            import imagecodecs
        except ImportError:
            return "JPEG XL needs the imagecodecs package: pip install imagecodecs"
        return None if imagecodecs.JPEGXL.available else "this imagecodecs build has no JPEG XL codec"

    return ClassicCodec("jxl", qualities, encode, decode, missing,
                        {"format": "JPEG XL", "quality": "libjxl quality (distance from quality), effort 7"})


_SWEEP = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
#: the classic codecs, in plot order; qualities span roughly 0.1-3 bpp on photographs
CODECS: dict[str, ClassicCodec] = {
    c.name: c for c in (
        _pillow_codec("jpeg", "JPEG", "jpg", (2, *_SWEEP), optimize=True),  # 4:2:0, optimal Huffman
        _pillow_codec("webp", "WEBP", "webp", (0, *_SWEEP), method=6),
        _pillow_codec("avif", "AVIF", "avif", (0, *_SWEEP), speed=6),
        _jxl_codec((1, *_SWEEP)),
    )
}


def pick_codecs(spec: str) -> tuple[list[ClassicCodec], list[str]]:
    """(codecs to run, notes on unavailable ones). 'auto': every one usable here; 'none': none."""
    spec = spec.strip().lower()
    if spec == "none":
        return [], []
    if spec == "auto":
        chosen, notes = [], []
        for c in CODECS.values():
            why = c.missing()
            if why:
                notes.append(f"{c.name} not run: {why}")
            else:
                chosen.append(c)
        return chosen, notes
    chosen = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        if name not in CODECS:
            raise UsageError(f"--codecs: unknown codec {name!r}; known: {', '.join(CODECS)}, or auto / none")
        why = CODECS[name].missing()
        if why:
            raise UsageError(f"--codecs {name}: {why}; or leave it out of --codecs")
        chosen.append(CODECS[name])
    return chosen, []


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


# ---------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
    ref: str
    family: str
    model: object
    source: str  # "checkpoint" or "registry"
    spec: dict
    weights_id: str
    setting: str = ""  # the point's name on its curve, set once all models are loaded

    def describe(self) -> dict:
        return {"ref": self.ref, "source": self.source, "family": self.family, "setting": self.setting,
                "spec": self.spec, "weights_id": self.weights_id}


def load_model(value: str, tracking_uri: str | None) -> LoadedModel:
    """[FAMILY=]REF, REF a .safetensors path or a registry NAME[@ALIAS|:VERSION]."""
    family, sep, ref = value.partition("=")
    if not sep or Path(value).exists():
        family, ref = "", value
    path = Path(ref)
    if path.suffix == ".safetensors" or path.exists():
        from compresszoo.models.io import load_weights

        model, source = load_weights(path), "checkpoint"
    else:
        if not tracking_uri:
            raise UsageError(f"--model {ref!r} is not a file, so it is read as a registry reference, which "
                             "needs the MLflow server: pass --tracking-uri or set MLFLOW_TRACKING_URI")
        try:
            from compresszoo.registry_client import load_registered
        except ImportError as e:
            raise UsageError(
                f"--model {ref!r} is not a file, and loading registered models needs "
                f"compresszoo.registry_client.load_registered, which this installation lacks ({e}); "
                "give a .safetensors checkpoint path instead") from None
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the registry client reads it
        model, source = load_registered(ref), "registry"
    from compresszoo.models import spec_of
    from compresszoo.models.io import weights_id

    spec = spec_of(model)
    model.eval()
    model.update()  # builds the CDF tables if the checkpoint lacks them; no-op otherwise
    return LoadedModel(ref, family or f"{spec.architecture}-{spec.metric}", model, source,
                       spec.to_dict(), weights_id(model))


def name_settings(models: list[LoadedModel]) -> None:
    """q<quality> on its family's curve; the reference is added where two models share one."""
    for m in models:
        m.setting = f"q{m.spec['quality']}"
    for m in models:
        if sum(o.family == m.family and o.setting.split()[0] == m.setting for o in models) > 1:
            m.setting = f"{m.setting} [{m.ref}]"


def run_model(m: LoadedModel, pictures: list[Picture]) -> list[dict]:
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


# ---------------------------------------------------------------------------- points, curves, BD


def summarize(curve: str, kind: str, setting: str, rows: list[dict], **extra) -> dict:
    """One RD point: per-image means (as CompressAI reports them) plus the rows themselves."""
    errors = [f"{r['image']}: {r['error']}" for r in rows if r.get("error")]
    point = {"curve": curve, "kind": kind, "setting": setting, **extra, "num_images": len(rows),
             "bpp": None, "payload_bpp": None, "psnr": None, "ms_ssim": None, "ms_ssim_db": None,
             "encode_seconds": None, "decode_seconds": None, "error": "; ".join(errors) or None,
             "images": rows}
    if errors or not rows:
        return point

    def mean(key):
        values = [r.get(key) for r in rows]
        return None if any(v is None for v in values) else float(np.mean(values))

    for key in ("bpp", "payload_bpp", "psnr", "ms_ssim", "encode_seconds", "decode_seconds"):
        point[key] = mean(key)
    if point["ms_ssim"] is not None:
        point["ms_ssim_db"] = rd.ms_ssim_db(point["ms_ssim"])
    return point


def _usable(p: dict, rate: str, quality: str) -> bool:
    return p["error"] is None and all(isinstance(p.get(k), float) and math.isfinite(p[k]) for k in (rate, quality))


def build_curves(points: list[dict], rate: str, quality: str) -> tuple[dict, dict]:
    """({label: RDCurve}, {label: {"front", "dominated", "error"}}) over each curve's points.

    A curve is the Pareto front of its usable points: a quality setting that costs more bits for
    less quality than another is listed as dominated instead of breaking the interpolation.
    """
    curves, info = {}, {}
    for label in dict.fromkeys(p["curve"] for p in points):
        mine = [p for p in points if p["curve"] == label and _usable(p, rate, quality)]
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
        doc = json.loads(path.read_text())
        results = doc["results"]
        metric = doc.get("metric", "mse")
        curves = {f"reference:{arch}-{metric}": rd.RDCurve(f"reference:{arch}-{metric}", r["bpp"], r["psnr"])
                  for arch, r in results.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
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


# ---------------------------------------------------------------------------- outputs


def _clean(obj):
    """JSON-safe: non-finite floats become None (JSON has no Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


POINT_COLUMNS = ("curve", "kind", "setting", "num_images", "bpp", "payload_bpp", "psnr", "ms_ssim",
                 "encode_seconds", "decode_seconds", "on_front", "error")
IMAGE_COLUMNS = ("curve", "setting", "image", "bytes", "bpp", "payload_bpp", "psnr", "ms_ssim",
                 "encode_seconds", "decode_seconds", "error")


def write_csv(path: Path, rows: list[dict], columns) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    _write(path, buf.getvalue())


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


STYLES = {"model": {"linestyle": "-", "marker": "o"}, "codec": {"linestyle": "--", "marker": "s"},
          "reference": {"linestyle": ":", "marker": "^"}}


def plot(path: Path, curves: dict, kinds: dict, points: list[dict], quality: str, ylabel: str, title: str,
         footnote: str) -> None:
    loose = []  # curves with fewer than 2 usable points still show up, as dots
    for label in dict.fromkeys(p["curve"] for p in points):
        if label not in curves:
            mine = [p for p in points if p["curve"] == label and _usable(p, "bpp", quality)]
            if mine:
                loose.append((label, [p["bpp"] for p in mine], [p[quality] for p in mine]))
    rd.plot_rd_curves(list(curves.values()), path, title=title, ylabel=ylabel,
                      styles={k: STYLES[kinds[k]] for k in curves}, scatter=loose, footnote=footnote)


# ---------------------------------------------------------------------------- MLflow


def _metric_name(*parts: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", p) for p in parts)


def log_to_mlflow(report: dict, out: Path, uri: str, experiment: str, run_name: str) -> str:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    # Same artifact-root convention as training runs (compresszoo.tracking).
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=os.environ.get("COMPRESSZOO_MLFLOW_ARTIFACTS") or None)
    run_id = client.create_run(exp_id, run_name=run_name, tags={"compresszoo.job": "evaluate"}).info.run_id
    try:
        params = {"images_dir": report["images"]["dir"], "num_images": len(report["images"]["evaluated"]),
                  "num_skipped": len(report["images"]["skipped"]),
                  "models": ",".join(m["ref"] for m in report["models"]),
                  "codecs": ",".join(report["codecs"]) or "none"}
        ts = int(time.time() * 1000)
        metrics = [Metric(_metric_name("bd_rate", b["test"], "vs", b["anchor"]), b["bd_rate_percent"], ts, 0)
                   for b in report["bd"] if b["bd_rate_percent"] is not None]
        metrics += [Metric(_metric_name("bd_psnr", b["test"], "vs", b["anchor"]), b["bd_psnr_db"], ts, 0)
                    for b in report["bd"] if b["bd_psnr_db"] is not None]
        for p in report["points"]:
            for key in ("bpp", "psnr", "ms_ssim"):
                if p[key] is not None and math.isfinite(p[key]):
                    metrics.append(Metric(_metric_name(p["curve"], p["setting"], key), p[key], ts, 0))
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        for i in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[i:i + 500])
        client.log_artifacts(run_id, str(out))
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def resolve_tracking_uri(arg: str | None) -> str | None:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else None (never MLflow's implicit ./mlruns)."""
    uri = arg or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{os.path.abspath(uri[len('sqlite:///'):])}"  # independent of later cwd changes
    return uri


# ---------------------------------------------------------------------------- driver


def evaluate(args) -> dict:
    folder = Path(args.images)
    pictures, skipped, ignored = load_folder(folder)
    for s in skipped:
        print(f"evaluate: skipping {s['name']}: {s['reason']}", file=sys.stderr)
    if not pictures:
        raise UsageError(f"--images {folder}: no usable image ({len(skipped)} skipped, {len(ignored)} "
                         "non-image files); give a folder of RGB PNG/JPEG images")
    uri = resolve_tracking_uri(args.tracking_uri)
    if args.mlflow and not uri:
        raise UsageError("--mlflow needs an explicit tracking server: pass --tracking-uri or set "
                         "MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db); MLflow's implicit default is not used")
    codecs, notes = pick_codecs(args.codecs)
    models = []
    for value in args.model:
        try:
            models.append(load_model(value, uri))
        except (OSError, ValueError, RuntimeError) as e:
            if isinstance(e, UsageError):
                raise
            raise UsageError(f"--model {value}: {e}") from None
    reference, ref_meta = load_reference(Path(args.reference)) if args.reference else ({}, None)

    name_settings(models)
    points = []
    for m in models:
        print(f"evaluate: {m.family} {m.setting} on {len(pictures)} images", file=sys.stderr)
        points.append(summarize(m.family, "model", m.setting, run_model(m, pictures), model=m.ref))
    for c in codecs:
        print(f"evaluate: {c.name} at {len(c.qualities)} qualities on {len(pictures)} images", file=sys.stderr)
        for q in c.qualities:
            points.append(summarize(c.name, "codec", f"quality={q}", run_codec(c, q, pictures), codec_quality=q))

    kinds = {p["curve"]: p["kind"] for p in points} | {k: "reference" for k in reference}
    curves, curve_info = build_curves(points, "bpp", "psnr")
    ms_curves, _ = build_curves(points, "bpp", "ms_ssim_db")
    # The reference counts the bitstreams only (CompressAI's bpp), so compare with the payload.
    payload_curves, _ = build_curves([p for p in points if p["kind"] == "model"], "payload_bpp", "psnr")
    for p in points:
        p["on_front"] = p["curve"] in curves and p["setting"] in curve_info[p["curve"]]["front"]

    model_curves = {k: v for k, v in curves.items() if kinds[k] == "model"}
    codec_curves = {k: v for k, v in curves.items() if kinds[k] == "codec"}
    bd = bd_rows({**model_curves, **codec_curves}, codec_curves, kinds, ms_curves, ms_curves)
    bd = [b for b in bd if not (b["test_kind"] == "codec" and b["anchor"] != "jpeg")]  # codecs: vs JPEG only
    if reference:
        bd += bd_rows(payload_curves, reference, kinds, {}, {}, rate_measure="payload_bpp")

    kodak = looks_like_kodak(pictures)
    if ignored:
        notes.append(f"not image files, ignored: {', '.join(ignored)}")
    for label, info in curve_info.items():
        if info["error"]:
            notes.append(f"no RD curve for {label}: {info['error']}")
        elif info["dominated"]:
            notes.append(f"{label}: dominated points left off the curve: {', '.join(info['dominated'])}")
    if reference:
        ref_meta["comparable"] = kodak
        ref_meta["note"] = (
            f"BD against the reference uses published results on {ref_meta.get('dataset') or 'its dataset'} "
            "with payload bpp (bitstreams only, as CompressAI counts). "
            + (f"These {len(pictures)} images look like Kodak, so the comparison is like for like."
               if kodak else
               f"These {len(pictures)} images are not Kodak (24 images of 768x512), so those numbers compare "
               "different images: indicative only. Run on Kodak for a meaningful comparison."))
        notes.append(ref_meta["note"])
        if not kodak:
            print(f"evaluate: warning: {ref_meta['note']}", file=sys.stderr)
    if any(min(p.rgb.shape[:2]) < MS_SSIM_MIN_SIDE for p in pictures):
        notes.append(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE} px a side; means are given only "
                     "where every image has it")
    notes.append("bpp counts whole files (model: .czoo container with its header; codecs: the image file); "
                 "PSNR and MS-SSIM are on the decoded image rounded to 8 bits, averaged over images.")

    report = {
        "schema": SCHEMA,
        "images": {"dir": str(folder), "evaluated": [{"name": p.name, "height": p.rgb.shape[0],
                                                      "width": p.rgb.shape[1], "note": p.note} for p in pictures],
                   "skipped": skipped, "ignored": ignored, "looks_like_kodak": kodak},
        "models": [m.describe() for m in models],
        "codecs": {c.name: c.describe() for c in codecs},
        "reference": ref_meta,
        "points": points,
        "curves": {label: {"kind": kinds[label], "bpp": list(c.rate), "psnr": list(c.quality),
                           "dominated": curve_info[label]["dominated"]} for label, c in curves.items()}
                  | {label: {"kind": "reference", "bpp": list(c.rate), "psnr": list(c.quality), "dominated": []}
                     for label, c in reference.items()},
        "bd": bd,
        "notes": notes,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "report.json", json.dumps(_clean(report), indent=1))
    write_csv(out / "rd_table.csv", points, POINT_COLUMNS)
    write_csv(out / "rd_images.csv",
              [{"curve": p["curve"], "setting": p["setting"], **r} for p in points for r in p["images"]],
              IMAGE_COLUMNS)
    _write(out / "report.md", markdown(report))
    footnote = f"{len(pictures)} images from {folder.name}" + ("" if kodak or not reference else
                                                              "; reference curves are on Kodak")
    plot(out / "rd_psnr.png", {**curves, **reference}, kinds, points, "psnr", "PSNR (dB, RGB)",
         "Rate-distortion: PSNR", footnote)
    if ms_curves:
        plot(out / "rd_ms_ssim.png", ms_curves, kinds, points, "ms_ssim_db", "MS-SSIM (dB)",
             "Rate-distortion: MS-SSIM", footnote)
    if args.mlflow:
        report["mlflow_run_id"] = log_to_mlflow(report, out, uri, args.experiment,
                                                args.run_name or f"evaluate-{folder.name}")
        print(f"evaluate: logged to MLflow run {report['mlflow_run_id']} at {uri}", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images to code")
    p.add_argument("--model", action="append", default=[], metavar="[FAMILY=]REF",
                   help="checkpoint (.safetensors) or registry NAME[@ALIAS|:VERSION]; repeat per model")
    p.add_argument("--codecs", default="auto",
                   help=f"classic codecs to run: comma list of {', '.join(CODECS)}; auto (default: all "
                        "available here) or none")
    p.add_argument("--reference", help="published results JSON to compare with (e.g. "
                                       "../shared/reference/compressai_kodak_mse.json; meaningful on Kodak)")
    p.add_argument("--out", default="evaluation", help="output folder (default: ./evaluation)")
    p.add_argument("--mlflow", action="store_true", help="log the tables and plots to an MLflow run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", default="compresszoo-evaluate", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name (default: evaluate-<images folder name>)")
    args = p.parse_args(argv)
    if not args.model and args.codecs.strip().lower() == "none":
        p.error("nothing to evaluate: give --model and/or --codecs")
    try:
        report = evaluate(args)
    except UsageError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"evaluated {len(report['images']['evaluated'])} images, skipped "
          f"{len(report['images']['skipped'])}: {', '.join(s['name'] for s in report['images']['skipped']) or '-'}")
    for b in report["bd"]:
        if b["anchor"] == "jpeg" or b["anchor_kind"] == "reference":
            value = f"{b['bd_rate_percent']:+.2f}%" if b["bd_rate_percent"] is not None else f"n/a ({b['error']})"
            print(f"BD-rate {b['test']} vs {b['anchor']}: {value}")
    print(f"wrote {out / 'report.json'}, {out / 'rd_table.csv'}, {out / 'report.md'}, {out / 'rd_psnr.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
