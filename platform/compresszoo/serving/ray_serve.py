"""Registered versions as a Ray Serve application: HTTP encode/decode at cluster scale.

    python pipelines/serve.py bmshj2018-hyperprior-mse-q8@champion [REF ...] --port 8000

Each reference (NAME@ALIAS or NAME:VERSION) becomes one Serve application at
/NAME/ALIAS-OR-VERSION with one deployment, `codec`, whose replicas autoscale between
min_replicas and max_replicas. Every replica loads its model once, from the registry, with
the checksum checked (registry_client.load_registered). Routes:

    POST /NAME/TAG/encode   body: an image file (PNG, JPEG, ...) -> .czoo bytes
    POST /NAME/TAG/decode   body: a .czoo file                   -> PNG
    GET  /NAME/TAG/         the model's identity (JSON)

Requests are batched (@serve.batch) and coded in a worker thread, one image at a time (a
file's bytes never depend on what it was batched with). Bodies are untrusted: the size is
checked before reading (MAX_REQUEST_BYTES, 413), images against limits.MAX_PIXELS from their
header (413), malformed input is a 400 with the reason, and any other failure a 500 for that
request only: the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import re

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from .. import limits

#: the largest request body read: a PNG/JPEG of limits.MAX_PIXELS' default is well under it
MAX_REQUEST_BYTES = limits.Limit("max_request_bytes", "COMPRESSZOO_MAX_REQUEST_BYTES", 64 << 20,
                                 "request body bytes")
BATCH_SIZE = 8
BATCH_WAIT_S = 0.005
CZOO_TYPE = "application/x-czoo"
#: settings a replica takes from the driver's environment (limits and the cache; no secrets)
FORWARDED_ENV = ("COMPRESSZOO_CACHE", *(lim.env for lim in (*limits.ALL, MAX_REQUEST_BYTES)))


def status_for(exc: BaseException) -> int:
    """The HTTP status of a failed request: too large 413, malformed 400, memory 503, else 500."""
    if isinstance(exc, limits.LimitError):
        return 413
    if isinstance(exc, ValueError):  # InputError, ContainerError, WeightsError
        return 400
    if isinstance(exc, MemoryError):
        return 503
    return 500


def encode_body(model, body: bytes) -> tuple[bytes, int, int]:
    """An image file's bytes -> (.czoo bytes, height, width), read as `compresszoo encode` reads."""
    from ..codec import encode_image
    from ..imagefiles import read_image

    x = read_image(body)
    return encode_image(model, x), int(x.shape[-2]), int(x.shape[-1])


def decode_body(model, body: bytes) -> tuple[bytes, int, int]:
    """.czoo bytes -> (PNG bytes, height, width); the header, the limits and the model's
    identity are checked before anything is decoded."""
    from ..codec import ContainerError, decode_image, read_header
    from ..imagefiles import image_bytes

    header = read_header(body)
    if header.batched:
        raise ContainerError(f"a batched .czoo file ({header.num_images} images) decodes to several "
                             "images; decode it with `compresszoo decode`")
    x_hat = decode_image(body, model)
    return image_bytes(x_hat), int(x_hat.shape[-2]), int(x_hat.shape[-1])


def _error(status: int, message: str) -> Response:
    return Response(json.dumps({"error": message}), status_code=status, media_type="application/json")


async def read_body(request: Request) -> bytes:
    """The body, refused (LimitError) past MAX_REQUEST_BYTES before more than that is read."""
    limit = MAX_REQUEST_BYTES.value()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        MAX_REQUEST_BYTES.check(int(declared), "request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            MAX_REQUEST_BYTES.check(size, "request (streamed)")
        chunks.append(chunk)
    return b"".join(chunks)


class CodecServer:
    """One replica: one model, loaded and verified once; encode and decode over HTTP."""

    def __init__(self, ref: str, tracking_uri: str | None = None, threads: int = 1):
        import torch

        from ..models.io import weights_id
        from ..models.registry import spec_of
        from ..registry_client import load_registered

        torch.set_num_threads(max(1, threads))
        self.model = load_registered(ref, tracking_uri)
        spec = spec_of(self.model)
        self.identity = {"ref": ref, "architecture": spec.architecture, "metric": spec.metric,
                         "quality": spec.quality, "N": spec.N, "M": spec.M,
                         "weights_id": weights_id(self.model), "routes": ["encode", "decode"]}

    async def __call__(self, request: Request) -> Response:
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET":
            return Response(json.dumps(self.identity), media_type="application/json")
        if request.method != "POST" or route not in ("encode", "decode"):
            return _error(404, f"{request.method} {request.url.path}: use POST .../encode (an image "
                          "file) or POST .../decode (a .czoo file), or GET for the model's identity")
        try:
            body = await read_body(request)
            if not body:
                raise ValueError(f"empty body; POST the {'image' if route == 'encode' else '.czoo'} file")
        except ValueError as e:
            return _error(status_for(e), str(e))
        outcome = await (self.encode(body) if route == "encode" else self.decode(body))
        if isinstance(outcome, BaseException):
            status = status_for(outcome)
            text = str(outcome) if status < 500 else f"internal error {type(outcome).__name__}: {outcome}"
            return _error(status, text)
        data, h, w, batch = outcome
        size = len(data) if route == "encode" else len(body)  # the compressed file's bytes
        headers = {"X-Height": str(h), "X-Width": str(w), "X-Bpp": f"{8 * size / (h * w):.6f}",
                   "X-Batch-Size": str(batch)}
        return Response(data, media_type=CZOO_TYPE if route == "encode" else "image/png", headers=headers)

    def _run(self, fn, bodies: list[bytes]) -> list:
        """Code each body on its own: one bad request fails alone, as its exception. A result
        carries the batch's size (the X-Batch-Size header)."""
        out = []
        for body in bodies:
            try:
                out.append((*fn(self.model, body), len(bodies)))
            except Exception as e:  # noqa: BLE001 - returned and answered as that request's status
                out.append(e)
        return out

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def encode(self, bodies: list[bytes]) -> list:
        return await asyncio.to_thread(self._run, encode_body, bodies)

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def decode(self, bodies: list[bytes]) -> list:
        return await asyncio.to_thread(self._run, decode_body, bodies)


def route_of(ref: str) -> str:
    """/NAME/ALIAS or /NAME/VERSION (NAME alone serves its champion)."""
    from ..registry_client import CHAMPION, parse_ref

    name, alias, version = parse_ref(ref)
    return f"/{name}/{version or alias or CHAMPION}"


def build_app(ref: str, *, tracking_uri: str | None = None, min_replicas: int = 1, max_replicas: int = 2,
              num_cpus: float = 1.0, target_ongoing_requests: float = 2.0):
    """The Serve application for one reference (bind only: nothing starts here)."""
    from ..tracking import resolve_tracking_uri

    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise ValueError(f"replicas: need 0 <= min ({min_replicas}) <= max ({max_replicas}) and max >= 1")
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    deployment = serve.deployment(
        CodecServer, name="codec",
        max_ongoing_requests=4 * BATCH_SIZE,
        autoscaling_config={"min_replicas": min_replicas, "initial_replicas": max(min_replicas, 1),
                            "max_replicas": max_replicas, "target_ongoing_requests": target_ongoing_requests,
                            "upscale_delay_s": 5, "downscale_delay_s": 60},
        ray_actor_options={"num_cpus": num_cpus, **({"runtime_env": {"env_vars": env}} if env else {})})
    # The URI resolved here (a relative sqlite path made absolute) means the same on every node.
    return deployment.bind(ref, resolve_tracking_uri(tracking_uri or ""), max(1, int(num_cpus)))


def app_name(ref: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", route_of(ref).strip("/"))


def start(refs: list[str], *, host: str = "127.0.0.1", port: int = 8000, **options) -> dict[str, str]:
    """Start one application per reference on the connected Ray cluster; {ref: base URL}.

    Serve's proxy address is fixed when Serve first starts on a cluster: a running Serve keeps
    its own (shut it down with `serve shutdown` to change it). options: build_app's.
    """
    serve.start(http_options={"host": host, "port": port})
    urls = {}
    for ref in refs:
        route = route_of(ref)
        serve.run(build_app(ref, **options), name=app_name(ref), route_prefix=route)
        urls[ref] = f"http://{host}:{port}{route}"
    return urls


def app_builder(args: dict):
    """The import_path of a Serve config file (`serve deploy`, KubeRay's RayService):
    compresszoo.serving.ray_serve:app_builder with args {ref: NAME@ALIAS, and optionally
    tracking_uri, min_replicas, max_replicas, num_cpus, target_ongoing_requests}."""
    options = dict(args)
    if "ref" not in options:
        raise ValueError("Serve config args need 'ref' (a registry reference NAME@ALIAS or NAME:VERSION)")
    return build_app(options.pop("ref"), **options)
