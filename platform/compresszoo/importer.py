"""Import a CompressAI checkpoint as a registry baseline: `compresszoo import-checkpoint`.

    compresszoo import-checkpoint FILE --arch A --metric M --quality Q (--images DIR | --data URI)
        [--registry URI] [--max-gap 0.03] [--min-side 256]

FILE is what CompressAI writes: its training script's checkpoint ({"state_dict": ...,
"optimizer": ...}) or a bare state dict (the published zoo weights). It is read with
torch.load(weights_only=True), so a file carrying pickled code is refused, never run. The
state dict (CompressAI's key names, DataParallel's "module." prefix, the older entropy
bottleneck names) loads strictly into the zoo model of --arch, sized by N and M read from its
own weights, and the model goes through the one gate path (publish.measure_and_log: update(),
real compression of the gate images, the report logged to an MLflow run). Only a model that
passes is registered: a baseline version of `<arch>-<metric>-q<quality>` tagged imported=true
with the sha256 of the source file, so sweeps and evaluate.py compare against it and
`compresszoo.zoo.<arch>(quality, pretrained=True)` loads it while it is the champion.
Importing the same file again finds that version instead of adding another.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import sys
import tempfile
from pathlib import Path

import torch

from .limits import MAX_CHANNELS, LimitError

IMPORTED_TAG = "imported"
SOURCE_SHA_TAG = "source_sha256"
SOURCE_FILE_TAG = "source_file"
PRESET = "import"  # TrainConfig.preset of an import's run
# CompressAI before 1.1 kept the bottleneck's factors in ParameterLists named with a leading
# underscore (_matrices.0); 1.1 to 1.2.x name them _matrix0, today's models matrices.0. The
# models load _matrix0 themselves (models/entropy.py); this maps the oldest form onto it.
_OLD_LISTS = re.compile(r"^(?P<pre>(?:.*\.)?entropy_bottleneck)\._(?P<kind>matrices|biases|factors)\.(?P<i>\d+)$")
_SINGULAR = {"matrices": "matrix", "biases": "bias", "factors": "factor"}


class CheckpointError(ValueError):
    """A file that is not a usable CompressAI checkpoint; the message names it and the fix."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a CompressAI checkpoint, read without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; give a CompressAI checkpoint (.pth.tar or .pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # the restricted unpickler met a callable: what a file that runs code holds
            raise CheckpointError(
                f"{path} holds pickled objects other than tensors and plain containers ({found[1]}), "
                "which could run code when loaded; refused. Re-save only the weights where you trust "
                "the file: torch.save({'state_dict': model.state_dict()}, path)") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (unpickling failed: "
                              f"{_last_line(e)}); give the .pth.tar CompressAI wrote") from None
    except Exception as e:  # noqa: BLE001 - zip, EOF, OS errors: not a readable torch file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{_last_line(e)}); give the .pth.tar CompressAI wrote") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state:
        keys = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} holds no state dict (found {keys}); give a checkpoint with a "
                              "'state_dict' entry or a bare state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: the state dict has {len(bad)} entries that are not named tensors "
                              f"(first {bad[0]!r}); give a model's state_dict()")
    return {_compressai_key(k): v for k, v in state.items()}


def _last_line(e: BaseException) -> str:
    """The informative line of a long torch error (its last non-empty one, shortened)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Check the doc")]
    return (lines[-1] if lines else type(e).__name__)[:200]


def _compressai_key(key: str) -> str:
    """A CompressAI key as the zoo models name it (DataParallel prefix, oldest bottleneck lists)."""
    key = key.removeprefix("module.")
    m = _OLD_LISTS.match(key)
    return f"{m['pre']}._{_SINGULAR[m['kind']]}{m['i']}" if m else key


def model_from_state_dict(state: dict, architecture: str, metric: str, quality: int, source: str = "the checkpoint"):
    """The zoo model of `architecture` with `state` loaded strictly; N and M are read from the
    weights (the registry name records them where they differ from the zoo table)."""
    from .models.registry import build, model_spec

    try:
        n, m = (int(state[k].shape[0]) for k in ("g_a.0.weight", "g_a.6.weight"))
    except KeyError as e:
        raise CheckpointError(f"{source} has no {e} tensor: not a checkpoint of {architecture} "
                              "(its analysis transform g_a must hold four convolutions)") from None
    try:
        for name, v in (("N", n), ("M", m)):
            MAX_CHANNELS.check(v, f"{source}: {name}")
    except LimitError as e:
        raise CheckpointError(str(e)) from None
    model = build(model_spec(architecture, quality, metric, N=n, M=m))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source} does not fit {architecture} (N={n}, M={m}): "
                              f"{(str(e).splitlines() or [''])[-1].strip()[:300]}; check --arch") from None
    return model.eval()


def gate_images(folder: str | Path) -> list[torch.Tensor]:
    """The RGB images of a folder as (3, H, W) floats in [0, 1]."""
    from .evaluate.images import load_folder

    pictures = load_folder(Path(folder)).pictures
    if not pictures:
        raise CheckpointError(f"--images {folder}: no usable RGB image in the folder; the gate needs "
                              "images of at least --min-side pixels a side")
    return [torch.from_numpy(p.rgb).permute(2, 0, 1).float() / 255.0 for p in pictures]


def _rd_loss(model, images: list[torch.Tensor], lmbda: float, metric: str) -> float:
    """The mean rate-distortion loss on the gate images: the val_loss that ranks the version
    against the registered ones (comparable where those were measured on the same images)."""
    from .codec.image import pad
    from .models.loss import RateDistortionLoss

    criterion = RateDistortionLoss(lmbda=lmbda, metric=metric)
    with torch.no_grad():
        losses = [criterion(model(pad(x[None])), pad(x[None]))["loss"].item() for x in images]
    return sum(losses) / len(losses)


def _already_imported(name: str, digest: str, uri: str):
    """The version of `name` imported from the file with sha256 `digest`, or None."""
    from .registry_client import _registry_exists
    from .tracking import client, mlflow_error_is

    if not _registry_exists(uri):
        return None
    try:
        versions = client(uri).search_model_versions(f"name = '{name}'")
    except Exception as e:
        if mlflow_error_is(e, "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise RuntimeError(f"looking up {name} in the MLflow registry at {uri} failed "
                           f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})") from e
    return next((v for v in versions if v.tags.get(SOURCE_SHA_TAG) == digest), None)


def import_checkpoint(path: str | Path, *, architecture: str, metric: str, quality: int,
                      images: str | Path | None = None, data: str = "", tracking_uri: str | None = None,
                      max_gap: float = 0.03, min_side: int = 256, gate_count: int = 8) -> dict:
    """Gate and register one CompressAI checkpoint; returns a summary row (gate verdict,
    bitrates, PSNR, registry name and version, or the reason it was refused).

    Gate images: the image files in `images`, or the held-out crops of the dataset at `data`
    (publish.held_out_images, as trained models are gated)."""
    from .config import TrainConfig
    from .models.io import WEIGHTS_FILE, save_weights
    from .models.registry import spec_of
    from .publish import RD_PLOT, held_out_images, manifest_sha, measure_and_log, rd_plot
    from .registry_client import register, sha256_file
    from .tracking import MlflowLogger, find_or_create_run, resolve_tracking_uri

    if (images is None) == (not data):
        raise CheckpointError("give the gate's images: --images DIR (image files) or --data URI "
                              "(a dataset folder holding _manifest.json), one of them")
    path = Path(path)
    model = model_from_state_dict(read_state_dict(path), architecture, metric, quality, str(path))
    digest = sha256_file(path)
    spec = spec_of(model)
    uri = resolve_tracking_uri(tracking_uri or "")
    cfg = TrainConfig(architecture=architecture, quality=quality, metric=metric, N=spec.N, M=spec.M,
                      lmbda=spec.lmbda, data=data, tracking_uri=uri, gate_max_gap=max_gap,
                      gate_min_side=min_side, gate_images=gate_count, preset=PRESET)
    row = {"architecture": architecture, "quality": quality, "metric": metric, "N": spec.N, "M": spec.M,
           "name": spec.registry_name, "source": str(path), SOURCE_SHA_TAG: digest, "version": None}
    done = _already_imported(spec.registry_name, digest, uri)
    if done is not None:
        return {**row, "gate": True, "reason": "already imported", "version": str(done.version)}
    pictures = gate_images(images) if images is not None else held_out_images(cfg)
    source_tags = {IMPORTED_TAG: "true", SOURCE_SHA_TAG: digest, SOURCE_FILE_TAG: path.name}
    run_id = find_or_create_run(uri, cfg.experiment, f"import-{spec.registry_name}-{digest[:16]}", source_tags)
    with tempfile.TemporaryDirectory(prefix="compresszoo-import-") as tmp:
        save_weights(model, Path(tmp) / WEIGHTS_FILE)
        model, report = measure_and_log(cfg, tmp, run_id, steps=0, images=pictures)
        overall = report["overall"]
        row.update(gate=report["passed"], reason=report["reason"], real_bpp=overall["real_bpp"],
                   estimated_bpp=overall["estimated_bpp"], psnr=overall["psnr"])
        logger = MlflowLogger(uri, run_id)
        if report["passed"]:
            val_loss = _rd_loss(model, pictures, spec.lmbda, metric)
            rd_point = {"bpp": overall["real_bpp"], "payload_bpp": overall["payload_bpp"],
                        "psnr": overall["psnr"], "ms_ssim": overall["ms_ssim"], "val_loss": val_loss}
            plot = rd_plot(report, Path(tmp) / RD_PLOT, title=spec.registry_name)
            tags = {**source_tags, "steps": 0, "config_hash": cfg.config_hash(), "run_name": cfg.run_name(),
                    "manifest_sha": manifest_sha(data) if data else "-"}
            version, champion = register(
                model, name=spec.registry_name, run_id=run_id, config=cfg.to_dict(), report=report,
                rd_point=rd_point, val_loss=val_loss, tracking_uri=uri, tags=tags,
                attachments={RD_PLOT: plot} if plot else None)
            row.update(version=version, champion=champion, val_loss=val_loss)
            logger.set_tags({"registry.name": spec.registry_name, "registry.version": version})
        logger.close()
    return row


def add_import_parser(subparsers) -> argparse.ArgumentParser:
    """Register `import-checkpoint` on a subparsers object (the compresszoo command's)."""
    from .models.registry import ARCHITECTURES, METRICS, QUALITIES

    p = subparsers.add_parser(
        "import-checkpoint", help="gate a CompressAI checkpoint and register it as a baseline version",
        description="Load a CompressAI .pth.tar (without running pickled code), run the bitrate gate "
                    "and register it, tagged imported=true with the file's sha256.")
    p.add_argument("file", help="the checkpoint CompressAI wrote (training checkpoint or bare state dict)")
    p.add_argument("--arch", required=True, choices=list(ARCHITECTURES))
    p.add_argument("--metric", default="mse", choices=list(METRICS))
    p.add_argument("--quality", required=True, type=int, choices=list(QUALITIES))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="a folder of RGB images for the gate (sides >= --min-side)")
    src.add_argument("--data", help="a dataset (folder with _manifest.json): gate on its held-out crops")
    p.add_argument("--registry", default=None,
                   help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--max-gap", type=float, default=0.03, help="largest real/estimated bitrate gap (0.03)")
    p.add_argument("--min-side", type=int, default=256, help="gate images at least this many pixels a side")
    p.set_defaults(fn=cmd_import_checkpoint)
    return p


def cmd_import_checkpoint(args) -> int:
    """0: registered (or already there); 1: refused by the gate. Bad input raises ValueError."""
    if not (math.isfinite(args.max_gap) and args.max_gap > 0) or args.min_side < 1:
        raise CheckpointError(f"--max-gap must be a positive fraction and --min-side positive, got "
                              f"{args.max_gap} and {args.min_side}")
    row = import_checkpoint(args.file, architecture=args.arch, metric=args.metric, quality=args.quality,
                            images=args.images, data=args.data or "", tracking_uri=args.registry,
                            max_gap=args.max_gap, min_side=args.min_side)
    if not row["gate"]:
        print(f"{row['name']}: refused by the gate: {row['reason']}; not registered", file=sys.stderr)
        return 1
    what = "already registered as" if row["reason"] == "already imported" else "registered as"
    print(f"{row['name']}: {row['reason']}; {what} version {row['version']} "
          f"(imported=true, source sha256 {row[SOURCE_SHA_TAG]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m compresszoo.importer import-checkpoint ...` (the compresszoo command's parser)."""
    ap = argparse.ArgumentParser(prog="compresszoo")
    add_import_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError, LimitError, RegistryError
        print(f"compresszoo {args.command}: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
