"""Rate-distortion math shared by the evaluation and the sweep report: RD curves, Bjontegaard
deltas (BD-rate, BD-PSNR) with pchip interpolation, Pareto fronts, and PNG plots.

BD follows the piecewise-cubic (pchip) variant of the JVET common test conditions: each curve
is interpolated with a monotone cubic Hermite spline (Fritsch-Carlson slopes, as MATLAB's and
SciPy's pchip) in log-rate, and the spline is integrated exactly over the interval both curves
cover. NumPy only; matplotlib and storage are imported inside plot_rd_curves.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class RDCurve:
    """A codec's operating points sorted by rate, with quality rising strictly with rate.

    rate: bits per pixel (> 0). quality: a higher-is-better measure in dB, such as PSNR or
    MS-SSIM in dB (see ms_ssim_db). Points may be given in any order; they are sorted here.
    """

    label: str
    rate: tuple[float, ...]
    quality: tuple[float, ...]

    def __post_init__(self):
        rate, quality = _floats(self.rate, "rate", self.label), _floats(self.quality, "quality", self.label)
        if len(rate) != len(quality):
            raise ValueError(f"RD curve {self.label!r}: {len(rate)} rates but {len(quality)} quality "
                             "values; give one quality per rate")
        if len(rate) < 2:
            raise ValueError(f"RD curve {self.label!r}: needs at least 2 points to interpolate, got "
                             f"{len(rate)}; evaluate more quality settings")
        if min(rate) <= 0:
            raise ValueError(f"RD curve {self.label!r}: rates must be > 0 bpp (BD works in log-rate), "
                             f"got {min(rate)}")
        order = sorted(range(len(rate)), key=lambda i: rate[i])
        rate, quality = tuple(rate[i] for i in order), tuple(quality[i] for i in order)
        for i in range(1, len(rate)):
            if rate[i] == rate[i - 1] or quality[i] <= quality[i - 1]:
                raise ValueError(
                    f"RD curve {self.label!r} is not monotone: quality {quality[i - 1]:.4f} at "
                    f"{rate[i - 1]:.5f} bpp, then {quality[i]:.4f} at {rate[i]:.5f} bpp; quality must "
                    "rise strictly with rate (drop dominated points with pareto_front() first)")
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "quality", quality)

    @property
    def log_rate(self) -> np.ndarray:
        return np.log(np.asarray(self.rate))

    def to_dict(self) -> dict:
        return {"label": self.label, "rate": list(self.rate), "quality": list(self.quality)}


def _floats(values, name: str, label: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"RD curve {label!r}: {name} must be a sequence of numbers, got {values!r}") from None
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"RD curve {label!r}: {name} has non-finite values {bad}; drop those points")
    return out


def as_curve(curve: RDCurve | tuple, label: str = "curve") -> RDCurve:
    """An RDCurve as is, or one built from a (rates, qualities) pair."""
    if isinstance(curve, RDCurve):
        return curve
    try:
        rate, quality = curve
    except (TypeError, ValueError):
        raise ValueError(f"{label}: expected an RDCurve or a (rates, qualities) pair, got {curve!r}") from None
    return RDCurve(label, rate, quality)


def ms_ssim_db(value: float) -> float:
    """MS-SSIM on the usual dB scale, -10 log10(1 - MS-SSIM), so BD can average it like PSNR."""
    return math.inf if value >= 1 else -10.0 * math.log10(1.0 - value)


# ---------------------------------------------------------------------------- pchip


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fritsch-Carlson derivatives at the knots (the pchip of MATLAB and SciPy)."""
    h = np.diff(x)
    m = np.diff(y) / h
    if len(x) == 2:
        return np.array([m[0], m[0]])
    d = np.zeros_like(y)
    w1, w2 = 2 * h[1:] + h[:-1], h[1:] + 2 * h[:-1]
    same_sign = (np.sign(m[1:]) == np.sign(m[:-1])) & (m[1:] != 0) & (m[:-1] != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = (w1 + w2) / (w1 / m[:-1] + w2 / m[1:])
    d[1:-1] = np.where(same_sign, harmonic, 0.0)
    d[0] = _edge_slope(h[0], h[1], m[0], m[1])
    d[-1] = _edge_slope(h[-1], h[-2], m[-1], m[-2])
    return d


def _edge_slope(h0: float, h1: float, m0: float, m1: float) -> float:
    """One-sided three-point slope, kept shape-preserving."""
    d = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
    if np.sign(d) != np.sign(m0):
        return 0.0
    if np.sign(m0) != np.sign(m1) and abs(d) > 3 * abs(m0):
        return 3 * m0
    return d


def _segments(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(K, 4) power-basis coefficients of each Hermite segment in t = x - x_k."""
    d = _pchip_slopes(x, y)
    h = np.diff(x)
    m = np.diff(y) / h
    c2 = (3 * m - 2 * d[:-1] - d[1:]) / h
    c3 = (d[:-1] + d[1:] - 2 * m) / h**2
    return np.stack([y[:-1], d[:-1], c2, c3], axis=1)


def pchip_integral(x: Sequence[float], y: Sequence[float], lo: float, hi: float) -> float:
    """Exact integral over [lo, hi] (inside [x_0, x_n]) of the pchip through (x, y); x rising."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not x[0] <= lo <= hi <= x[-1]:
        raise ValueError(f"integration interval [{lo}, {hi}] is outside the data range [{x[0]}, {x[-1]}]")
    total = 0.0
    for k, (c0, c1, c2, c3) in enumerate(_segments(x, y)):
        a, b = max(lo, x[k]), min(hi, x[k + 1])
        if b > a:
            def antiderivative(t, c0=c0, c1=c1, c2=c2, c3=c3):
                return t * (c0 + t * (c1 / 2 + t * (c2 / 3 + t * c3 / 4)))
            total += antiderivative(b - x[k]) - antiderivative(a - x[k])
    return float(total)


def pchip_eval(x: Sequence[float], y: Sequence[float], at: float) -> float:
    """The pchip through (x, y) at one point inside [x_0, x_n]; x rising."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if not x[0] <= at <= x[-1]:
        raise ValueError(f"{at} is outside the data range [{x[0]}, {x[-1]}]; pchip does not extrapolate")
    k = min(int(np.searchsorted(x, at, side="right")) - 1, len(x) - 2)
    c0, c1, c2, c3 = _segments(x, y)[k]
    t = at - x[k]
    return float(c0 + t * (c1 + t * (c2 + t * c3)))


def quality_at_rate(curve: RDCurve | tuple, bpp: float) -> float:
    """The curve's quality at a rate inside its range (pchip in log-rate)."""
    c = as_curve(curve)
    _inside(c, "rate", c.rate, bpp, "bpp")
    return pchip_eval(c.log_rate, c.quality, math.log(bpp))


def rate_at_quality(curve: RDCurve | tuple, quality: float) -> float:
    """The rate (bpp) the curve needs for a quality inside its range (pchip in log-rate)."""
    c = as_curve(curve)
    _inside(c, "quality", c.quality, quality, "dB")
    return math.exp(pchip_eval(c.quality, c.log_rate, quality))


def _inside(c: RDCurve, what: str, values, v: float, unit: str) -> None:
    if not values[0] <= v <= values[-1]:
        raise ValueError(f"RD curve {c.label!r} spans {what} {values[0]:.4f}-{values[-1]:.4f} {unit}; "
                         f"{v} is outside it and pchip does not extrapolate")


# ---------------------------------------------------------------------------- Bjontegaard


def _overlap(a: Sequence[float], b: Sequence[float], what: str, anchor: RDCurve, test: RDCurve,
             unit: str) -> tuple[float, float]:
    lo, hi = max(a[0], b[0]), min(a[-1], b[-1])
    if hi <= lo:
        raise ValueError(
            f"RD curves {anchor.label!r} ({what} {a[0]:.3f}-{a[-1]:.3f} {unit}) and {test.label!r} "
            f"({b[0]:.3f}-{b[-1]:.3f} {unit}) do not overlap in {what}; BD needs a common range, "
            "so add operating points that reach into the other curve's range")
    return lo, hi


def bd_rate(anchor: RDCurve | tuple, test: RDCurve | tuple) -> float:
    """Bjontegaard delta rate in percent: the test's average rate change against the anchor at
    equal quality, over the quality range both cover. Negative: the test needs fewer bits."""
    a, t = as_curve(anchor, "anchor"), as_curve(test, "test")
    lo, hi = _overlap(a.quality, t.quality, "quality", a, t, "dB")
    ia = pchip_integral(a.quality, a.log_rate, lo, hi)
    it = pchip_integral(t.quality, t.log_rate, lo, hi)
    return (math.exp((it - ia) / (hi - lo)) - 1.0) * 100.0


def bd_quality(anchor: RDCurve | tuple, test: RDCurve | tuple) -> float:
    """Bjontegaard delta quality (BD-PSNR when quality is PSNR), in dB: the test's average
    quality change against the anchor at equal rate, over the log-rate range both cover."""
    a, t = as_curve(anchor, "anchor"), as_curve(test, "test")
    la, lt = a.log_rate, t.log_rate
    lo, hi = _overlap(la, lt, "log-rate", a, t, "ln bpp")
    ia = pchip_integral(la, a.quality, lo, hi)
    it = pchip_integral(lt, t.quality, lo, hi)
    return (it - ia) / (hi - lo)


bd_psnr = bd_quality


def bd_summary(anchor: RDCurve | tuple, test: RDCurve | tuple) -> dict:
    """BD-rate and BD-quality of test vs anchor for a report; never raises on bad curves.

    {"anchor", "test", "bd_rate_percent", "bd_quality_db", "quality_overlap_db",
     "rate_overlap_bpp", "error"}: on a problem the numbers are None and error says why.
    """
    out: dict[str, Any] = {"anchor": getattr(anchor, "label", "anchor"), "test": getattr(test, "label", "test"),
                           "bd_rate_percent": None, "bd_quality_db": None, "quality_overlap_db": None,
                           "rate_overlap_bpp": None, "error": None}
    try:
        a, t = as_curve(anchor, "anchor"), as_curve(test, "test")
        q_lo, q_hi = max(a.quality[0], t.quality[0]), min(a.quality[-1], t.quality[-1])
        r_lo, r_hi = max(a.rate[0], t.rate[0]), min(a.rate[-1], t.rate[-1])
        out["quality_overlap_db"] = [q_lo, q_hi] if q_hi > q_lo else None
        out["rate_overlap_bpp"] = [r_lo, r_hi] if r_hi > r_lo else None
        out["bd_rate_percent"] = bd_rate(a, t)
        out["bd_quality_db"] = bd_quality(a, t)
    except ValueError as e:
        out["error"] = str(e)
    return out


# ---------------------------------------------------------------------------- Pareto front


Key = str | int | Callable[[Any], float]


def _getter(key: Key) -> Callable[[Any], float]:
    return key if callable(key) else (lambda p: p[key])


def pareto_front(points: Iterable[Any], rate: Key = "bpp", quality: Key = "psnr") -> list:
    """The points that no other point beats, sorted by rising rate (and so rising quality).

    A point is dropped when another has rate <= and quality >= with one of them strict, so the
    front gives the least rate for each reachable quality across all configurations. Points are
    mappings (rate/quality name keys), sequences (indexes) or anything the key callables read.
    """
    get_r, get_q = _getter(rate), _getter(quality)
    items = list(points)
    values = []
    for i, p in enumerate(items):
        try:
            r, q = float(get_r(p)), float(get_q(p))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"point {i} ({p!r}) has no numeric rate {rate!r} and quality {quality!r} "
                             f"({type(e).__name__}: {e}); filter out failed points first") from None
        if not (math.isfinite(r) and math.isfinite(q)):
            raise ValueError(f"point {i} ({p!r}) has a non-finite rate or quality; filter it out first")
        values.append((r, q))
    order = sorted(range(len(items)), key=lambda i: (values[i][0], -values[i][1]))
    front, best = [], -math.inf
    for i in order:
        if values[i][1] > best:
            front.append(items[i])
            best = values[i][1]
    return front


def curve_from_points(label: str, points: Iterable[Any], rate: Key = "bpp",
                      quality: Key = "psnr") -> tuple[RDCurve, list]:
    """(curve through the Pareto front of the points, the dominated points left out).

    Raises ValueError when fewer than 2 points are left on the front.
    """
    items = list(points)
    front = pareto_front(items, rate, quality)
    kept = {id(p) for p in front}
    dominated = [p for p in items if id(p) not in kept]
    get_r, get_q = _getter(rate), _getter(quality)
    return RDCurve(label, [get_r(p) for p in front], [get_q(p) for p in front]), dominated


# ---------------------------------------------------------------------------- plots


def plot_rd_curves(curves: Sequence[RDCurve], path: str | os.PathLike, *, title: str = "",
                   xlabel: str = "rate (bits per pixel)", ylabel: str = "PSNR (dB)",
                   styles: Mapping[str, Mapping[str, Any]] | None = None,
                   scatter: Sequence[tuple[str, Sequence[float], Sequence[float]]] = (),
                   footnote: str = "") -> Path:
    """Write a PNG of RD curves (lines through the points) plus optional loose points.

    styles: matplotlib line options per curve label. scatter: (label, rates, qualities) for
    points that are not a curve (single models, all trials behind a Pareto front).
    Uses the Agg canvas directly, so no pyplot state or display is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .. import storage  # here, not at the top: the RD math needs neither pyarrow nor matplotlib

    styles = styles or {}
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for c in curves:
        style = {"marker": "o", "markersize": 3.5, "linewidth": 1.4, **styles.get(c.label, {})}
        ax.plot(c.rate, c.quality, label=c.label, **style)
    for label, r, q in scatter:
        ax.scatter(list(r), list(q), label=label, s=18, alpha=0.6, **styles.get(label, {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if curves or scatter:
        ax.legend(fontsize="small", loc="lower right")
    if footnote:
        fig.text(0.01, 0.005, footnote, fontsize="x-small", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.03 if footnote else 0, 1, 1))
    with storage.staged_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
