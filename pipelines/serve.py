"""Serve registered models over HTTP with Ray Serve: encode (image -> .czoo) and decode
(.czoo -> PNG), batched, autoscaling replicas, each loading its model once from the registry.

    python pipelines/serve.py bmshj2018-hyperprior-mse-q8-N8-M12@champion [REF ...] \\
        [--port 8000] [--min-replicas 1] [--max-replicas 2] [--num-cpus 1] [--detach]

    curl --data-binary @photo.png http://127.0.0.1:8000/NAME/champion/encode -o photo.czoo
    curl --data-binary @photo.czoo http://127.0.0.1:8000/NAME/champion/decode -o back.png

Ray: the cluster in RAY_ADDRESS (`. .cluster/env.sh` for the local cluster: token auth stays
on), else the latest one started here, else a new local Ray (--address local forces that).
Registry: --tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db. Without --detach the
command serves until Ctrl-C and then deletes its applications; with it, the applications stay
on the cluster until `serve.shutdown()`. Exit status: 0 done, 2 bad input, 1 failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

try:
    import compresszoo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("refs", nargs="+", metavar="REF", help="registry reference NAME@ALIAS or NAME:VERSION")
    p.add_argument("--host", default="127.0.0.1", help="address of Serve's HTTP proxy (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port of Serve's HTTP proxy (default 8000)")
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--tracking-uri", help="MLflow registry (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, the latest cluster, else local)")
    p.add_argument("--detach", action="store_true", help="deploy and exit; the applications keep running on the (existing) cluster")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from compresszoo.registry_client import parse_ref
    from compresszoo.serving.ray_serve import app_name, start

    try:
        for ref in args.refs:
            parse_ref(ref)
    except ValueError as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    # --detach needs a cluster that outlives this command: "auto" refuses to start a local Ray.
    ray.init(address=args.address or ("auto" if args.detach else None), log_to_driver=False)
    try:
        urls = start(args.refs, host=args.host, port=args.port, tracking_uri=args.tracking_uri,
                     min_replicas=args.min_replicas, max_replicas=args.max_replicas, num_cpus=args.num_cpus)
    except (ValueError, RuntimeError) as e:  # bad options; a model that fails to load
        print(f"serve: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    for ref, url in urls.items():
        print(f"{ref}: POST {url}/encode (image -> .czoo), POST {url}/decode (.czoo -> PNG), GET {url}/")
    if args.detach:
        return 0
    print("serving; Ctrl-C stops and deletes these applications", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        for ref in args.refs:
            serve.delete(app_name(ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
