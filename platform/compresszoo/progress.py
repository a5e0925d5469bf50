"""What the zoo job shows while it runs: one progress line per model, named phases, no log spam.

Progress comes from where training already writes it: rank 0 logs loss, bpp, PSNR and
images/s to the model's MLflow run every `log_every` steps, so the driver (or a sweep's
driver) polls that run's latest metrics (a `watching` block) instead of reading Ray's
per-report lines. On a terminal the lines of the running models are redrawn in place; when
stdout is a file or a pipe (`ray job submit`, CI, `| tee`) each model prints a plain line at
most every COMPRESSZOO_PROGRESS_EVERY seconds (default 30) and at every phase change, so
the log reads the same, without carriage returns.

`quiet_ray_logging(verbose)` is the other half: Ray's worker output (per-report
`TrainingReport(...)` lines, deduplicated warnings, internal error lines) and Ray Data's
progress bars stay in the Ray logs unless --verbose asks for them.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

#: the phases a model goes through in the zoo job, in order ("skipped": already registered)
PHASES = ("sharding", "training", "gate", "registering", "done", "skipped", "failed")
EVERY_ENV = "COMPRESSZOO_PROGRESS_EVERY"
_CLEAR_LINE, _UP = "\x1b[2K", "\x1b[{}F"


def _seconds_from_env(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: give seconds, e.g. {default:g}") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{name}={raw!r}: give a finite number of seconds >= 0")
    return value


def eta_text(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class _Model:
    phase: str = ""
    total: int = 0
    step: int = 0
    metrics: dict = field(default_factory=dict)
    first: tuple[int, float] | None = None  # (step, time) of the first observation: the rate's origin
    rate: float | None = None  # steps per second since `first`
    printed: float = -math.inf  # when plain mode last printed this model's line


class Display:
    """Thread-safe progress for several models at once (the zoo job trains them concurrently).

    live: redraw in place (default: when the stream is a terminal); every: seconds between a
    model's plain lines (default: $COMPRESSZOO_PROGRESS_EVERY or 30). stream None means
    sys.stdout at each write (so a redirected stdout is honoured)."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None, every: float | None = None,
                 clock=time.monotonic, prefix: str = "[train_zoo]"):
        self._stream = stream
        self.live = live if live is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = _seconds_from_env(EVERY_ENV, 30.0) if every is None else every
        self.clock, self.prefix = clock, prefix
        self.models: dict[str, _Model] = {}
        self._lock = threading.RLock()
        self._drawn = 0  # lines of the live block currently on screen

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    # -- what callers report ----------------------------------------------------------------
    def phase(self, key: str, phase: str, detail: str = "", *, total: int | None = None) -> None:
        """`key` enters `phase` (one of PHASES): a permanent line, e.g. "gate: compressing 8 images"."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}: use one of {', '.join(PHASES)}")
        with self._lock:
            m = self.models.setdefault(key, _Model())
            m.phase = phase
            if total is not None:
                m.total = total
            self._permanent(f"{key}: {phase}" + (f": {detail}" if detail else ""))

    def update(self, key: str, step: int, metrics: dict | None = None, *, total: int | None = None) -> None:
        """A training observation: `step` of the total with the latest metrics."""
        with self._lock:
            m = self.models.setdefault(key, _Model(phase="training"))
            now = self.clock()
            if total is not None:
                m.total = total
            if m.first is None or step < m.first[0]:
                m.first = (step, now)
            elif step > m.first[0] and now > m.first[1]:
                m.rate = (step - m.first[0]) / (now - m.first[1])
            m.step, m.metrics = step, {**m.metrics, **(metrics or {})}
            if self.live:
                self._redraw()
            elif now - m.printed >= self.every or (m.total and step >= m.total):
                m.printed = now
                self._write(f"{self.prefix} {self.line(key)}\n")

    def message(self, text: str) -> None:
        """A job-level line (the plan, where MLflow is, the final table)."""
        with self._lock:
            self._permanent(text)

    def line(self, key: str) -> str:
        """The model's progress line: step of total, loss, bpp, PSNR, images/s, ETA."""
        m = self.models[key]
        parts = [f"{key}: {m.phase or 'training'}"]
        if m.total:
            parts.append(f"step {m.step}/{m.total} ({100 * m.step / m.total:.0f}%)")
        elif m.step:
            parts.append(f"step {m.step}")
        for label, name, fmt in (("loss", "loss", ".4g"), ("bpp", "bpp", ".4f"), ("PSNR", "psnr", ".2f")):
            if isinstance(m.metrics.get(name), (int, float)):
                parts.append(f"{label} {m.metrics[name]:{fmt}}" + (" dB" if name == "psnr" else ""))
        if isinstance(m.metrics.get("images_per_second"), (int, float)):
            parts.append(f"{m.metrics['images_per_second']:.1f} img/s")
        if m.total and m.phase == "training":
            left = m.total - m.step
            parts.append(f"ETA {eta_text(left / m.rate if m.rate else (0.0 if left <= 0 else None))}")
        return "  ".join(parts)

    # -- drawing -----------------------------------------------------------------------------
    def _active(self) -> list[str]:
        return [k for k, m in self.models.items() if m.phase == "training" and (m.step or m.total)]

    def _permanent(self, text: str) -> None:
        if self.live:
            self._erase()
        self._write(f"{self.prefix} {text}\n")
        if self.live:
            self._redraw()

    def _erase(self) -> None:
        if self._drawn:
            self._write(_UP.format(self._drawn) + "\x1b[J")
            self._drawn = 0

    def _redraw(self) -> None:
        self._erase()
        lines = [self.line(k) for k in self._active()]
        if lines:
            self._write("".join(f"{_CLEAR_LINE}{self.prefix} {ln}\n" for ln in lines))
        self._drawn = len(lines)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


_default: Display | None = None


def default() -> Display:
    """The process's display (created on first use; train_zoo sets it with set_default)."""
    global _default
    if _default is None:
        _default = Display()
    return _default


def set_default(display: Display) -> Display:
    global _default
    _default = display
    return display


#: the metrics a progress line shows, as train.py's rank 0 logs them
SHOWN = ("loss", "bpp", "psnr", "images_per_second")


def latest_training_metrics(client, run_id: str) -> tuple[int, dict] | None:
    """(step, {metric: latest value}) of a run's training metrics, or None before the first log.

    The step is that of the latest `loss` (every training log has one); a run's metrics
    come back with their steps only through the entity's proto."""
    metrics = {m.key: m for m in client.get_run(run_id).data.to_proto().metrics if m.key in SHOWN}
    if "loss" not in metrics:
        return None
    return int(metrics["loss"].step), {k: m.value for k, m in metrics.items()}


class RunWatcher:
    """Polls one MLflow run every `interval` seconds and feeds `display.update(key, ...)`.

    The run is found by id or by its compresszoo run key (fit creates it, so it may not
    exist yet when watching starts). A failing poll is skipped: progress is never worth
    stopping a training for."""

    def __init__(self, display: Display, key: str, *, tracking_uri: str, total: int,
                 run_id: str | None = None, experiment: str | None = None, run_key: str | None = None,
                 interval: float = 2.0):
        if run_id is None and not (experiment and run_key):
            raise ValueError("RunWatcher needs run_id, or experiment and run_key")
        self.display, self.key, self.total, self.interval = display, key, total, interval
        self.tracking_uri, self.run_id, self.experiment, self.run_key = tracking_uri, run_id, experiment, run_key
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{key}", daemon=True)
        self._last_step: int | None = None

    def start(self) -> RunWatcher:
        import mlflow.tracking  # noqa: F401 - imported here: a first import racing the caller's breaks

        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and take one last reading (the final step's metrics)."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.poll()

    def poll(self) -> None:
        from .tracking import client, find_run

        try:
            if self.run_id is None:
                run = find_run(self.tracking_uri, self.experiment, self.run_key)
                if run is None:
                    return
                self.run_id = run.info.run_id
            got = latest_training_metrics(client(self.tracking_uri), self.run_id)
        except Exception:  # noqa: BLE001 - a missed reading is retried at the next interval
            return
        if got is not None and got[0] != self._last_step:
            self._last_step = got[0]
            self.display.update(self.key, got[0], got[1], total=self.total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()


@contextmanager
def watching(display: Display, key: str, *, tracking_uri: str, total: int, run_id: str | None = None,
             experiment: str | None = None, run_key: str | None = None,
             interval: float | None = None, detail: str = "") -> Iterator[RunWatcher]:
    """Show `key`'s training progress while the block runs (a zoo model's fit, a sweep trial);
    the run is given by run_id or by experiment and run_key; detail ends the phase line.

    interval: seconds between polls (default 2 on a terminal, else the display's `every`,
    at most 30): a plain log is not polled faster than it prints."""
    if interval is None:
        interval = 2.0 if display.live else max(2.0, min(display.every, 30.0))
    display.phase(key, "training", f"{total} steps" + (f", {detail}" if detail else ""), total=total)
    watcher = RunWatcher(display, key, tracking_uri=tracking_uri, total=total, run_id=run_id,
                         experiment=experiment, run_key=run_key, interval=interval).start()
    try:
        yield watcher
    finally:
        watcher.stop()


def quiet_ray_logging(verbose: bool) -> dict:
    """Keep Ray's and MLflow's chatter out of the job's output unless `verbose`; returns the
    ray.init keyword arguments that go with it (log_to_driver: worker output -- Ray Train's
    per-report lines, deduplicated warnings, internal error lines -- stays in the Ray logs,
    /tmp/ray/session_latest/logs or the dashboard, instead of streaming to this driver)."""
    import logging

    if verbose:
        return {"log_to_driver": True}
    import mlflow  # noqa: F401 - its import configures its loggers (INFO): set them after it
    from ray.data import DataContext

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # its "Downloading artifacts" bars
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    DataContext.get_current().enable_progress_bars = False  # the gate reads its images on the driver
    # ...and Ray Data says once, at WARNING, that it has no bars
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    return {"log_to_driver": False, "logging_level": logging.WARNING}
