"""Shard Vimeo90K (local folder or s3:// prefix) into Parquet shards + _manifest.json for training.

    python pipelines/prepare_vimeo90k.py --src /data/vimeo_septuplet --dst s3://bucket/vimeo90k
    python pipelines/prepare_vimeo90k.py --make-miniature /tmp/mini --dst /tmp/mini-shards

Rerunning with the same arguments after a crash resumes. S3 endpoint and credentials come from
the environment (AWS_ENDPOINT_URL or COMPRESSZOO_S3_ENDPOINT, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    import compresszoo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    _SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform")
    sys.path.insert(0, _SRC)
    # Ray workers started from here must import it too.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SRC, os.environ.get("PYTHONPATH")) if p)

from compresszoo.data import BadInputError, ManifestError, make_miniature, prepare  # noqa: E402
from compresszoo.data.shards import DEFAULT_ROW_GROUP_MB, DEFAULT_SHARD_MB  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="Vimeo90K folder (holds sequences/ and the *_trainlist.txt/*_testlist.txt lists)")
    p.add_argument("--dst", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--tuplet", choices=["auto", "sep", "tri"], default="auto", help="which lists to read (default: auto)")
    p.add_argument("--shard-size-mb", type=float, default=DEFAULT_SHARD_MB)
    p.add_argument("--row-group-mb", type=float, default=DEFAULT_ROW_GROUP_MB)
    p.add_argument("--on-bad", choices=["skip", "fail"], default="skip",
                   help="bad frames and list lines: leave out and name them in the manifest, or stop")
    p.add_argument("--codec", choices=["qoi", "png"], default="qoi",
                   help="store frames as lossless QOI (fast to decode, default) or as the source PNG bytes")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the one-time shuffle of training frames")
    p.add_argument("--max-parallel", type=int, default=None, help="shards written at once (default: cluster CPUs)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS or a local one)")
    p.add_argument("--make-miniature", metavar="DIR",
                   help="first write a miniature Vimeo90K from scikit-image photos to DIR and use it as --src")
    p.add_argument("--miniature-sequences", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)

    src = args.src
    if args.make_miniature:
        src = make_miniature(args.make_miniature, sequences=args.miniature_sequences,
                             test_sequences=max(1, args.miniature_sequences // 4))
    if not src:
        p.error("give --src, or --make-miniature DIR")

    import ray

    if args.ray_address:  # otherwise prepare() starts a local Ray only once the input checks pass
        ray.init(address=args.ray_address, log_to_driver=False)
    try:
        prepare(
            src,
            args.dst,
            tuplet=args.tuplet,
            shard_size_mb=args.shard_size_mb,
            row_group_mb=args.row_group_mb,
            on_bad=args.on_bad,
            shuffle_seed=args.shuffle_seed,
            max_parallel=args.max_parallel,
            progress=not args.quiet,
            codec=args.codec,
        )
    except (BadInputError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
