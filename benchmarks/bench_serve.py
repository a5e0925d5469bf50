"""Ray Serve encode throughput and latency on 127.0.0.1: 1 and 2 replicas against a
single-process loop calling encode_image directly (the reference, measured in the same run).

A bounded load test: --requests POSTs of one real photo crop (PNG) with --concurrency client
threads, after a warm-up; it stops by itself. The model is registered in a temporary sqlite
registry and loaded by each replica from there, as `pipelines/serve.py` does. Replicas get
1 CPU and 1 torch thread each; the reference loop runs with 1 torch thread too.

    python benchmarks/bench_serve.py [--requests 48] [--concurrency 8] [--size 256] \\
        [--arch bmshj2018-hyperprior] [--quality 1] [--num-cpus 4]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def _photo_png(size: int) -> tuple[bytes, torch.Tensor]:
    from PIL import Image
    from skimage import data

    arr = np.ascontiguousarray(data.astronaut()[:size, :size])
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), torch.from_numpy(arr).permute(2, 0, 1).float() / 255


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        out = r.read()
        if r.status != 200 or not out.startswith(b"CZ"):
            raise RuntimeError(f"{url}: HTTP {r.status} {out[:200]!r}")
    return time.perf_counter() - t0


def _stats(latencies: list[float], wall: float) -> dict:
    q = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    return {"p50_ms": float(q[0]), "p99_ms": float(q[1]), "images_s": len(latencies) / wall}


def reference(model, x: torch.Tensor, n: int) -> dict:
    from compresszoo.codec import encode_image

    torch.set_num_threads(1)
    encode_image(model, x)  # warm-up
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        encode_image(model, x)
        lat.append(time.perf_counter() - t)
    return _stats(lat, time.perf_counter() - t0)


def load(url: str, body: bytes, n: int, concurrency: int) -> dict:
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: _post(url, body), range(2 * concurrency)))  # warm-up, both replicas
        t0 = time.perf_counter()
        lat = list(pool.map(lambda _: _post(url, body), range(n)))
    return _stats(lat, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="square photo crop, pixels a side")
    ap.add_argument("--arch", default="bmshj2018-hyperprior")
    ap.add_argument("--quality", type=int, default=1, help="zoo quality (full-size N, M)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = ap.parse_args()

    import ray
    from ray import serve

    from compresszoo import registry_client as rc
    from compresszoo.models import create_model
    from compresszoo.models.registry import spec_of
    from compresszoo.serving.ray_serve import app_name, build_app, route_of
    from compresszoo.tracking import client as tracking_client

    body, x = _photo_png(args.size)
    torch.manual_seed(0)
    model = create_model(args.arch, args.quality).eval()
    model.update(force=True)
    name = spec_of(model).registry_name
    ref = f"{name}@champion"
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["COMPRESSZOO_CACHE"] = f"{tmp}/cache"
        client = tracking_client(uri)
        exp = client.create_experiment("bench", artifact_location=f"{tmp}/artifacts")
        rc.register(model, name=name, run_id=client.create_run(exp).info.run_id, config={}, report={},
                    rd_point={}, tags={}, val_loss=1.0, tracking_uri=uri)
        rows = {"encode_image loop (1 process, 1 thread)": reference(model, x, args.requests)}
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}{route_of(ref)}/encode"
        try:
            for replicas in (1, 2):
                app = build_app(ref, tracking_uri=uri, min_replicas=replicas, max_replicas=replicas, num_cpus=1)
                serve.run(app, name=app_name(ref), route_prefix=route_of(ref))
                rows[f"Ray Serve, {replicas} replica(s), {args.concurrency} clients"] = load(
                    url, body, args.requests, args.concurrency)
        finally:
            serve.shutdown()
            ray.shutdown()

    ref_rate = next(iter(rows.values()))["images_s"]
    print(f"\n{name}, {args.size}x{args.size} astronaut crop, {args.requests} requests, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"| {'setup':<44} | p50 ms | p99 ms | images/s | vs loop |")
    print(f"| {'-' * 44} | ------ | ------ | -------- | ------- |")
    for label, r in rows.items():
        print(f"| {label:<44} | {r['p50_ms']:6.1f} | {r['p99_ms']:6.1f} | {r['images_s']:8.2f} | "
              f"{r['images_s'] / ref_rate:6.2f}x |")


if __name__ == "__main__":
    main()
