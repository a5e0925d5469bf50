"""Child process of tests/test_portable.py: encode or decode under machine configurations.

    python portable_child.py SPEC.json

SPEC: {"mode": "encode"|"decode", "configs": {name: {...}}, "weights": {model: path},
"data": path, "out": path}. ONEDNN_MAX_CPU_ISA can only be set before a process starts: the
parent sets it in this process's environment. The other configurations are applied in turn
in this process: "threads", "mkldnn" (bool), "float64" (the float layers in float64), "bf16"
(bf16 autocast, a stand-in for a GPU's lower precision), "ulps" (every float32 convolution /
matmul result scaled by 1 + ulps * 2**-23, a stand-in for other kernels' summation order),
"shuffle" (float64 convolutions and GEMMs summed with their input channels reversed: the
same sums in another order).
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def patched(ulps: int = 0, shuffle: bool = False):
    saved = F.conv2d, F.conv_transpose2d, torch.addmm, torch.baddbmm
    conv2d, deconv, addmm, baddbmm = saved
    factor = 1.0 + ulps * 2.0 ** -23

    def out32(out):
        return out * factor if ulps and out.dtype == torch.float32 else out

    def conv(x, w, b=None, *args, **kwargs):
        if shuffle and x.dtype == torch.float64:
            return conv2d(x.flip(1), w.flip(1), b, *args, **kwargs)
        return out32(conv2d(x, w, b, *args, **kwargs))

    def tconv(x, w, b=None, *args, **kwargs):
        if shuffle and x.dtype == torch.float64:
            return deconv(x.flip(1), w.flip(0), b, *args, **kwargs)
        return out32(deconv(x, w, b, *args, **kwargs))

    def mm(b, a, w, *args, **kwargs):
        if shuffle and a.dtype == torch.float64:
            return addmm(b, a.flip(1), w.flip(0), *args, **kwargs)
        return out32(addmm(b, a, w, *args, **kwargs))

    def bmm(*args, **kwargs):
        return out32(baddbmm(*args, **kwargs))

    F.conv2d, F.conv_transpose2d, torch.addmm, torch.baddbmm = conv, tconv, mm, bmm
    try:
        yield
    finally:
        F.conv2d, F.conv_transpose2d, torch.addmm, torch.baddbmm = saved


def run(spec: dict, cfg: dict, models: dict, data) -> dict:
    torch.set_num_threads(int(cfg.get("threads", 2)))
    torch.backends.mkldnn.enabled = bool(cfg.get("mkldnn", True))
    if cfg.get("float64"):
        models = {n: m.double() for n, m in models.items()}
    auto = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.get("bf16") else contextlib.nullcontext()
    out = {}
    with auto, patched(int(cfg.get("ulps", 0)), bool(cfg.get("shuffle"))), torch.no_grad():
        for name, model in models.items():
            for portable in (False, True):
                key = f"{name}|{int(portable)}"
                if spec["mode"] == "encode":
                    c = model.compress(data["x"].to(model.g_a[0].weight.dtype), portable=portable)
                    out[key] = {"strings": c["strings"], "shape": list(c["shape"])}
                    continue
                try:
                    c = data[key]
                    y_hat = model.decompress(c["strings"], torch.Size(c["shape"]), portable=portable)["y_hat"]
                    out[key] = y_hat.float()
                except (ValueError, RuntimeError) as exc:  # a desynchronised stream
                    out[key] = f"error: {exc}"
    if cfg.get("float64"):
        for m in models.values():
            m.float()
    return out


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    from compresszoo.models.io import load_weights

    models = {name: load_weights(path) for name, path in spec["weights"].items()}
    results = {}
    for name, cfg in spec["configs"].items():
        data = torch.load(spec["data"][name] if isinstance(spec["data"], dict) else spec["data"], weights_only=True)
        results[name] = run(spec, cfg, models, data)
    torch.save(results, spec["out"])


if __name__ == "__main__":
    main()
