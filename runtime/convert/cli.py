"""Convert a published SiT / REPA / Self-Flow checkpoint into a zoo run directory.

Usage::

    python -m runtime.convert SRC --to DIR --format sit|repa|selfflow [--preset XL/2] [--heads H]
        [--num-classes N] [--latent-size 32] [--latent-channels 4] [--base-spec SPEC.json]
        [--set KEY=VALUE]... [--name NAME] [--weights auto|ema|model] [--keep-heads] [--step N] [--force]

``SRC`` is a ``.pt``/``.pth`` torch file (read with ``torch.load(weights_only=True)``; the training
checkpoints of SiT/REPA are ``{"model", "ema", "opt", "args"}`` dicts, ``args`` an ``argparse.Namespace``,
which is the one non-tensor class allowed) or a ``.safetensors`` file. ``--weights auto`` picks what the
official loaders pick: ``ema`` for SiT/REPA, ``model`` (then ``state_dict``) for Self-Flow, else the other
entry, else the file itself; a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix is removed.

Writes ``DIR/checkpoints/step_XXXXXXXX/`` (:func:`storage.checkpoint.save_checkpoint`: ``model.safetensors``
with ``backbone.*`` / ``objective.*`` keys, ``ema.safetensors`` = the same backbone weights, an empty
optimizer state, ``spec.resolved.json``, ``meta.json`` with the provenance), plus ``DIR/spec.resolved.json``
and ``DIR/conversion.json``. ``python -m runtime.sample DIR`` then samples from it. The directory is for
sampling and evaluation (or as weights to start a new run from); it is not a ``--resume`` target (no
optimizer/loader state).

The spec starts from ``--base-spec`` (default ``specs/fm_imagenet256_xl2.json``: ImageNet 256, SD-VAE
``weights/sd-vae-ft-ema``, SDE 250 steps); the backbone is replaced by the converted one (preset + the sizes
read from the weights), ``data.num_classes``, the data size and the autoencoder's latent channels are set
to fit the weights, then ``--set`` edits are applied and the result is validated. To sample real images a
user needs a local SD-VAE in diffusers ``save_pretrained`` layout (``config.json`` +
``diffusion_pytorch_model.safetensors``, e.g. ``stabilityai/sd-vae-ft-ema``) at ``weights/sd-vae-ft-ema``
relative to the working directory, or ``--set autoencoder.path=/path/to/sd-vae-ft-ema``; nothing is
downloaded. Sampling does not read the data; evaluation may.

``python -m runtime.convert detector {i3d,vggish} SRC --out DST.safetensors`` converts the feature extractors of
the ``fvd`` / ``fad`` metrics instead (:mod:`runtime.convert.detector`).

Key layouts, one module per format (``runtime/convert/{sit,repa,selfflow}.py``; every source key must be
consumed, every target key filled with its exact shape):

"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.convert import repa, selfflow, sit
from runtime.convert.base import ConversionError
from runtime.convert.plan import convert
from runtime.convert.source import FORMATS
from runtime.convert.target import DEFAULT_BASE_SPEC


def description() -> str:
    """This module's docstring followed by each format's key layout."""
    return (__doc__ or "") + "".join(m.LAYOUT for m in (sit, repa, selfflow))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["detector"]:  # the fvd / fad feature extractors: runtime/convert/detector.py
        from runtime.convert import detector

        return detector.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m runtime.convert", description=description(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="published checkpoint (.pt/.pth or .safetensors)")
    ap.add_argument("--to", dest="out", type=Path, required=True, help="run directory to write")
    ap.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    ap.add_argument("--preset", default=None, help="SiT preset (default: the one matching the weights, e.g. XL/2)")
    ap.add_argument("--heads", type=int, default=None,
                    help="attention heads (not in the weights; default: the preset's)")
    ap.add_argument("--patch", type=int, default=None,
                    help="patch size for a Linear patch embedding (default: the preset's, else 2)")
    ap.add_argument("--num-classes", type=int, default=None, help="check: classes without the null row")
    ap.add_argument("--latent-size", type=int, default=None, help="check (or set, without pos_embed): latent side")
    ap.add_argument("--latent-channels", type=int, default=None, help="check: latent channels")
    ap.add_argument("--base-spec", type=Path, default=None,
                    help=f"spec to start from (default specs/{DEFAULT_BASE_SPEC.name})")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="edit the spec before validation (VALUE parsed as JSON, else a string)")
    ap.add_argument("--name", default=None, help="run name in the spec (default <format>_<file stem>)")
    ap.add_argument("--weights", default="auto", choices=("auto", "ema", "model"),
                    help="which weights of a training checkpoint (auto: as the official loader)")
    ap.add_argument("--keep-heads", action="store_true", help="keep projector heads as the objective's weights")
    ap.add_argument("--step", type=int, default=0, help="step number of the written checkpoint")
    ap.add_argument("--force", action="store_true", help="write into a run directory that has checkpoints")
    args = ap.parse_args(argv)
    try:
        convert(args.src, args.out, args.fmt, weights=args.weights, step=args.step, force=args.force,
                keep_heads=args.keep_heads, patch=args.patch, base_spec=args.base_spec, preset=args.preset,
                heads=args.heads, num_classes=args.num_classes, latent_size=args.latent_size,
                latent_channels=args.latent_channels, sets=args.sets, name=args.name)
    except ConversionError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0
