"""``python -m runtime.convert detector {i3d,vggish} SRC --out DST.safetensors [--run-torchscript]``

One-time conversion of a published feature extractor into the safetensors state dict the ``fvd`` / ``fad``
metrics load (:mod:`zoo.metrics.fvd`, :mod:`zoo.metrics.fad`):

* ``i3d``: cd-fvd's ``i3d_pretrained_400.pt`` (piergiaj/pytorch-i3d layout, a plain state dict, read with
  ``torch.load(weights_only=True)``; keys map one to one), or StyleGAN-V's ``i3d_torchscript.pt`` (a TorchScript
  archive). Loading TorchScript EXECUTES THE CODE STORED IN THE FILE (``torch.jit.load``), so it is refused unless
  ``--run-torchscript`` is given; run it once, on a file you trust, and keep the safetensors it writes. Its
  tensors are matched by name where the names fit, else by order and shape (every shape must line up).
* ``vggish``: torchvggish's ``vggish-10086976.pth`` (a plain state dict; ``features.*`` / ``embeddings.*`` map
  one to one; PCA parameters, if present, are dropped: fadtk does not use them).

The result is checked by loading it strictly into the network and running one forward pass.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with ``code/`` entries (a plain ``torch.save`` zip has none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def _clean(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def match_state(net: nn.Module, src: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """``src`` as ``net``'s state dict: by name when every name of ``net`` is in ``src`` with its shape; else the
    floating tensors of both in order, each pair of the same shape (integer counters such as
    ``num_batches_tracked`` are taken from ``net``). Raises ValueError naming the first mismatch."""
    want = net.state_dict()
    if all(k in src and tuple(src[k].shape) == tuple(v.shape) for k, v in want.items()):
        return {k: src[k].detach().clone().to(want[k].dtype) for k in want}
    ours = [k for k, v in want.items() if v.is_floating_point()]
    theirs = [k for k, v in src.items() if v.is_floating_point()]
    if len(ours) != len(theirs):
        missing = [k for k in want if k not in src][:3]
        raise ValueError(f"{what}: {len(theirs)} floating tensors, the network has {len(ours)} (names not found "
                         f"either, e.g. {missing})")
    out = {k: v.clone() for k, v in want.items() if not v.is_floating_point()}
    for a, b in zip(ours, theirs):
        if tuple(want[a].shape) != tuple(src[b].shape):
            raise ValueError(f"{what}: tensor {b} {tuple(src[b].shape)} does not fit {a} {tuple(want[a].shape)}")
        out[a] = src[b].detach().clone().to(want[a].dtype)
    return out


def read_source(path: Path, run_torchscript: bool) -> dict[str, Tensor]:
    """The tensors of ``path``: a safetensors file, a plain torch state dict, or (only with ``run_torchscript``)
    a TorchScript module's state dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        if not run_torchscript:
            raise ValueError(f"{path} is a TorchScript archive: loading it executes the code it contains. Pass "
                             "--run-torchscript to do so (once, on a file you trust)")
        print(f"warning: executing the TorchScript code in {path} (torch.jit.load)", file=sys.stderr)
        module = torch.jit.load(str(path), map_location="cpu")
        return {k: v for k, v in module.state_dict().items()}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return obj


def build(kind: str) -> tuple[nn.Module, Tensor]:
    """The network of ``kind`` and one probe input."""
    if kind == "i3d":
        from zoo.metrics.fvd import I3D

        return I3D(), torch.zeros(1, 3, 16, 224, 224)
    from zoo.metrics.fad import VGGish

    return VGGish(), torch.zeros(1, 1, 96, 64)


def convert(kind: str, src: Path, out: Path, run_torchscript: bool = False) -> Path:
    """Write ``out`` (safetensors) from ``src``; returns ``out``."""
    from safetensors.torch import save_file

    sd = _clean(read_source(src, run_torchscript))
    if kind == "vggish":
        sd = {k: v for k, v in sd.items() if not k.startswith("pca_")}
    net, probe = build(kind)
    state = match_state(net, sd, str(src))
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        y = net.eval()(probe)
    if not torch.isfinite(y).all():
        raise ValueError(f"{src}: the converted network gives non-finite outputs")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out),
              metadata={"source": src.name, "format": kind})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.convert detector", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["i3d", "vggish"])
    ap.add_argument("src", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="the .safetensors to write")
    ap.add_argument("--run-torchscript", action="store_true",
                    help="allow reading a TorchScript archive (this executes the code stored in it)")
    args = ap.parse_args(argv)
    try:
        out = convert(args.kind, args.src, args.out, args.run_torchscript)
    except (OSError, ValueError, RuntimeError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print(f"wrote {out} ({args.kind} state dict from {args.src})")
    return 0
