"""Export a trained ``clip_vae`` or ``sprite_vae`` run as a frozen autoencoder directory that flow specs load by path:
``python -m runtime.export_autoencoder RUN_OR_CHECKPOINT OUT_DIR [--weights ema|model] [--stats-samples N]``.

``OUT_DIR`` gets ``model.safetensors`` (the network's weights only: no optimizer, no EMA shadow) and
``config.json``: the backbone params, the sample shape and data spec it was trained on, the source checkpoint
and step, the per-channel mean and std of the posterior means of the first ``N`` training samples (the latent
normalisation, so the flow model sees unit-scale latents), and the SHA-256 of the weights file, which the
loader checks. Both files are written through temporary siblings and renamed, config last.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from storage.checkpoint import find_checkpoint, load_weights
from storage.safe_state import sha256_file
from storage.files import write_json_atomic


EXPORTABLE = ("clip_vae", "sprite_vae")
"""Backbone tags whose trained run exports to a directory that the autoencoder entry of the same tag loads."""


def export(run: str | Path, out: str | Path, *, weights: str = "ema", stats_samples: int = 2048) -> Path:
    """Write the exported directory ``out`` (see the module docstring) and return it."""
    import zoo  # noqa: F401  (registers the entries)
    from registry.kinds import BACKBONES, DATASETS
    from zoo.autoencoders.clip_vae import CONFIG, WEIGHTS
    from zoo.autoencoders.conv_vae import compute_latent_stats

    ck = find_checkpoint(Path(run))
    raw, state, is_ema = load_weights(ck, prefer_ema=weights == "ema")
    if weights == "ema" and not is_ema:
        raise FileNotFoundError(f"{ck}: no EMA weights (ema.safetensors); pass --weights model")
    kind = raw.get("backbone", {}).get("type")
    if kind not in EXPORTABLE:
        raise ValueError(f"{ck} trained a {kind!r} network; exportable: {', '.join(EXPORTABLE)}")
    if not is_ema:
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    bp = BACKBONES.get(kind).Params.model_validate(raw["backbone"])
    dp = DATASETS.get(raw["data"]["type"]).Params.model_validate(raw["data"])
    shape = tuple(int(s) for s in dp.sample_shape())
    token_dim, grid = bp.token_layout(shape)
    backbone = BACKBONES.build(bp, token_dim=token_dim, grid=grid)
    backbone.load_state_dict(state)
    net = backbone.net.eval()
    mean, std = compute_latent_stats(backbone.eval(), raw, stats_samples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(out / WEIGHTS)
    config = {"format": f"{kind}-export-1", "backbone": bp.model_dump(mode="json"), "sample_shape": list(shape),
              "data": raw["data"], "source": {"checkpoint": str(ck), "weights": "ema" if is_ema else "model",
                                               "stats_samples": stats_samples},
              "latent_mean": mean, "latent_std": std, "sha256": sha256_file(out / WEIGHTS)}
    write_json_atomic(out / CONFIG, config)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.export_autoencoder", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run directory (its newest checkpoint) or checkpoint directory of a clip_vae or sprite_vae run")
    ap.add_argument("out", help="directory to write config.json and model.safetensors into")
    ap.add_argument("--weights", choices=("ema", "model"), default="ema")
    ap.add_argument("--stats-samples", type=int, default=2048)
    a = ap.parse_args(argv)
    try:
        out = export(a.run, a.out, weights=a.weights, stats_samples=a.stats_samples)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
