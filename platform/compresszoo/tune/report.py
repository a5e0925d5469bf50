"""The sweep's report from its trial rows: best (N, M) per (architecture, lambda), RD curves,
BD-rate against the zoo's default channels, the Pareto front, PNG plots and the tuned-zoo config.

Pure bookkeeping over rows (dicts); the RD math and plots come from rd.py.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from ..evaluate.rd import bd_summary, curve_from_points, pareto_front, plot_rd_curves

REPORT_FILE, CONFIG_FILE, PARETO_PLOT = "report.json", "tuned_zoo.json", "pareto.png"
RATE, QUALITY = "payload_bpp", "psnr"  # every RD point: the coder's real payload, decoded PSNR


def rd_cost(row: dict) -> float | None:
    """The training objective measured with the real bitrate: lambda * 255^2 * MSE + bpp
    (MSE models), lambda * (1 - MS-SSIM) + bpp (MS-SSIM models); None without a point."""
    bpp, psnr = row.get(RATE), row.get(QUALITY)
    if bpp is None:
        return None
    if row.get("metric", "mse") == "ms-ssim":
        ms = row.get("ms_ssim")
        return None if ms is None else row["lmbda"] * (1.0 - ms) + bpp
    if psnr is None or not math.isfinite(psnr):
        return None
    return row["lmbda"] * 255.0**2 * 10.0 ** (-psnr / 10.0) + bpp


def has_point(row: dict) -> bool:
    return row.get("status") == "completed" and row.get(RATE) is not None and row.get(QUALITY) is not None


def _rank(row: dict) -> tuple:
    cost = row.get("rd_cost")
    return (cost is None, cost if cost is not None else row.get("val_loss", math.inf), row["name"])


def best_per_lambda(rows: list[dict], *, zoo_default_only: bool = False) -> dict[tuple[str, float], dict]:
    """(architecture, lambda) -> the completed trial with the lowest real RD cost."""
    best: dict[tuple[str, float], dict] = {}
    for r in rows:
        if not has_point(r) or (zoo_default_only and not r["zoo_default"]):
            continue
        key = (r["architecture"], r["lmbda"])
        if key not in best or _rank(r) < _rank(best[key]):
            best[key] = r
    return best


def _curve(label: str, points: list[dict]) -> tuple[object | None, dict]:
    """(RDCurve or None, its JSON view). A curve runs through the Pareto front of its points."""
    view = {"label": label, "points": [_point(p) for p in points], "curve": None, "dropped": [], "error": None}
    if len(points) < 2:
        view["error"] = f"{len(points)} point(s); a curve needs at least 2 lambdas with a completed trial"
        return None, view
    try:
        curve, dominated = curve_from_points(label, points, RATE, QUALITY)
    except ValueError as e:
        view["error"] = str(e)
        return None, view
    view["curve"] = curve.to_dict()
    view["dropped"] = [p["name"] for p in dominated]
    return curve, view


def _point(r: dict) -> dict:
    return {k: r.get(k) for k in ("name", "lmbda", "N", "M", "seed", RATE, QUALITY, "rd_cost")}


def build_report(rows: list[dict], *, sweep: str, max_steps: int) -> dict:
    rows = sorted(rows, key=lambda r: (r["architecture"], r["lmbda"], r["N"], r["M"], r["seed"]))
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    run_steps = sum(int(r.get("steps") or 0) for r in rows)
    full = max_steps * len(rows)
    tuned, default = best_per_lambda(rows), best_per_lambda(rows, zoo_default_only=True)
    archs = {}
    for arch in sorted({r["architecture"] for r in rows}):
        t_pts = [tuned[k] for k in sorted(tuned) if k[0] == arch]
        d_pts = [default[k] for k in sorted(default) if k[0] == arch]
        t_curve, t_view = _curve(f"{arch} tuned (N, M)", t_pts)
        d_curve, d_view = _curve(f"{arch} zoo (N, M)", d_pts)
        if t_curve is not None and d_curve is not None:
            bd = bd_summary(d_curve, t_curve)
        else:
            bd = {"anchor": d_view["label"], "test": t_view["label"], "bd_rate_percent": None,
                  "bd_quality_db": None, "error": d_view["error"] or t_view["error"]}
        archs[arch] = {"tuned": t_view, "zoo_default": d_view, "bd_vs_zoo_default": bd,
                       "changed": [t["name"] for t in t_pts if not t["zoo_default"]]}
    points = [r for r in rows if has_point(r)]
    front = pareto_front(points, RATE, QUALITY) if points else []
    return {
        "sweep": sweep,
        "rate": RATE, "quality": QUALITY,
        "counts": {"total": len(rows), **dict(counts)},
        "trial_steps": {"run": run_steps, "full_budget": full,
                        "saved_fraction": 1.0 - run_steps / full if full else 0.0},
        "best": [_best_entry(r) for _, r in sorted(tuned.items())],
        "architectures": archs,
        "pareto_front": [_point(r) | {"architecture": r["architecture"]} for r in front],
        "trials": rows,
    }


def _best_entry(r: dict) -> dict:
    return {k: r[k] for k in ("architecture", "quality", "lmbda", "N", "M", "seed", "name", "zoo_default",
                              RATE, QUALITY, "rd_cost")}


def tuned_zoo_config(report: dict, *, metric: str = "mse") -> tuple[list[dict], list[dict]]:
    """(entries for `train_zoo.py --config`, entries left out).

    One entry per (architecture, quality): the registry names a model by quality, so when two
    swept lambdas map to the same quality, the one nearest that quality's zoo lambda wins.
    """
    from ..models.registry import lambda_for

    chosen: dict[tuple[str, int], dict] = {}
    left_out = []
    for b in report["best"]:
        key = (b["architecture"], b["quality"])
        zoo = lambda_for(b["quality"], metric)
        if key in chosen:
            other = chosen[key]
            keep, drop = sorted([b, other], key=lambda e: abs(math.log(e["lmbda"] / zoo)))
            chosen[key] = keep
            left_out.append({**drop, "reason": f"quality {b['quality']} already taken by lambda {keep['lmbda']:g}"})
        else:
            chosen[key] = b
    entries = []
    for (arch, q), b in sorted(chosen.items()):
        entry = {"architecture": arch, "quality": q, "N": b["N"], "M": b["M"], "lmbda": b["lmbda"], "seed": b["seed"]}
        if metric != "mse":
            entry["metric"] = metric
        entries.append(entry)
    return entries, left_out


def write_report(report: dict, out_dir: str | Path, *, metric: str = "mse") -> dict[str, Path]:
    """report.json, tuned_zoo.json, one RD plot per architecture and the Pareto plot, in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    rows = report["trials"]
    for arch, a in report["architectures"].items():
        curves = [c for c in (_as_rd(a["zoo_default"]), _as_rd(a["tuned"])) if c is not None]
        pts = [r for r in rows if r["architecture"] == arch and has_point(r)]
        scatter = [(label, [r[RATE] for r in group], [r[QUALITY] for r in group])
                   for label, group in (("trials, zoo (N, M)", [r for r in pts if r["zoo_default"]]),
                                        ("trials, other (N, M)", [r for r in pts if not r["zoo_default"]]))
                   if group]
        bd = a["bd_vs_zoo_default"]
        note = (f"BD-rate tuned vs zoo (N, M): {bd['bd_rate_percent']:+.2f}%" if bd.get("bd_rate_percent") is not None
                else f"BD-rate: n/a ({bd.get('error')})")
        paths[f"rd_{arch}"] = plot_rd_curves(
            curves, out / f"rd_{arch}.png", title=f"{report['sweep']}: {arch}", scatter=scatter,
            xlabel="rate (payload bits per pixel, measured by the coder)", footnote=note[:300],
            styles={a["zoo_default"]["label"]: {"linestyle": "--"}})
    pts = [r for r in rows if has_point(r)]
    front = report["pareto_front"]
    curves = []
    if len(front) >= 2:
        from ..evaluate.rd import RDCurve

        curves = [RDCurve("Pareto front", [p[RATE] for p in front], [p[QUALITY] for p in front])]
    scatter = [(arch, [r[RATE] for r in pts if r["architecture"] == arch],
                [r[QUALITY] for r in pts if r["architecture"] == arch]) for arch in report["architectures"]]
    paths["pareto"] = plot_rd_curves(curves, out / PARETO_PLOT, title=f"{report['sweep']}: all trials",
                                     scatter=[s for s in scatter if s[1]],
                                     xlabel="rate (payload bits per pixel, measured by the coder)")
    entries, left_out = tuned_zoo_config(report, metric=metric)
    report["tuned_zoo"] = {"entries": entries, "left_out": left_out, "file": CONFIG_FILE}
    report["plots"] = sorted(p.name for p in paths.values())
    paths["config"] = out / CONFIG_FILE
    paths["config"].write_text(json.dumps({"sweep": report["sweep"], "models": entries}, indent=2))
    paths["report"] = out / REPORT_FILE
    paths["report"].write_text(json.dumps(report, indent=2, default=str))
    return paths


def _as_rd(view: dict):
    from ..evaluate.rd import RDCurve

    c = view.get("curve")
    return None if c is None else RDCurve(view["label"], c["rate"], c["quality"])


def markdown_summary(report: dict) -> str:
    lines = ["| arch | lambda | best N,M | zoo N,M? | payload bpp | PSNR | RD cost |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in report["best"]:
        cost = "-" if b["rd_cost"] is None else f"{b['rd_cost']:.4f}"
        lines.append(f"| {b['architecture']} | {b['lmbda']:g} | {b['N']},{b['M']} | "
                     f"{'yes' if b['zoo_default'] else 'no'} | {b[RATE]:.4f} | {b[QUALITY]:.2f} | {cost} |")
    for arch, a in report["architectures"].items():
        bd = a["bd_vs_zoo_default"]
        val = f"{bd['bd_rate_percent']:+.2f}%" if bd.get("bd_rate_percent") is not None else f"n/a ({bd.get('error')})"
        lines.append(f"\nBD-rate {arch}, tuned vs zoo (N, M): {val}")
    c, s = report["counts"], report["trial_steps"]
    lines.append(f"\ntrials: {c}; trial-steps run {s['run']} of {s['full_budget']} "
                 f"({s['saved_fraction']:.0%} saved by early stopping)")
    return "\n".join(lines)
