"""The ``image`` modality (patchify / unpatchify, layout, spec checks) and the ``identity`` autoencoder."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zoo  # noqa: F401  (registers the built-ins)
from registry.kinds import AUTOENCODERS, MODALITIES
from zoo.core.protocols import Autoencoder, Modality
from zoo.autoencoders.identity import IdentityAutoencoder, IdentityAutoencoderParams
from zoo.modalities.image import ImageModality, ImageModalityParams

PARAMS = ImageModalityParams(type="image")


def _dit_unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """DiT ``models.py`` ``unpatchify`` (generalised to h != w), transcribed for the comparison."""
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)


@settings(deadline=None, max_examples=25)
@given(b=st.integers(1, 3), c=st.integers(1, 4), p=st.sampled_from([1, 2, 4]), h=st.integers(1, 4),
       w=st.integers(1, 4))
def test_round_trip_and_dit_order(b, c, p, h, w):
    mod = ImageModality(PARAMS, backbone_patch=p, latent_shape=(c, h * p, w * p))
    assert mod.grid == (h, w) and mod.token_dim == c * p * p and mod.num_tokens == h * w
    z = torch.randn(b, c, h * p, w * p)
    tokens = mod.to_tokens(z)
    assert tokens.shape == (b, h * w, c * p * p)
    assert torch.equal(mod.from_tokens(tokens), z)
    assert torch.equal(_dit_unpatchify(tokens, p, c, h, w), z)


def test_token_layout_formula():
    c, p, h, w = 3, 2, 2, 3
    mod = ImageModality(PARAMS, backbone_patch=p, latent_shape=(c, h * p, w * p))
    z = torch.arange(c * h * p * w * p, dtype=torch.float32).reshape(1, c, h * p, w * p)
    tok = mod.to_tokens(z)
    for i in range(h):
        for j in range(w):
            for di in range(p):
                for dj in range(p):
                    for ch in range(c):
                        assert tok[0, i * w + j, (di * p + dj) * c + ch] == z[0, ch, i * p + di, j * p + dj]


def test_layout_without_tensors():
    assert ImageModalityParams.layout((4, 32, 32), 2) == ((16, 16), 16)
    assert PARAMS.layout((3, 8, 12), 4) == ((2, 3), 48)
    with pytest.raises(ValueError, match="not divisible"):
        PARAMS.layout((4, 30, 32), 4)
    with pytest.raises(ValueError, match="3-D"):
        PARAMS.layout((4, 32), 2)


def test_shape_errors():
    mod = MODALITIES.build(PARAMS, backbone_patch=2, latent_shape=(4, 8, 8))
    assert isinstance(mod, Modality)
    with pytest.raises(ValueError):
        mod.to_tokens(torch.zeros(1, 4, 8, 6))
    with pytest.raises(ValueError):
        mod.from_tokens(torch.zeros(1, 16, 15))


def _spec(sample_shape, patch):
    return SimpleNamespace(
        data=SimpleNamespace(sample_shape=lambda: sample_shape),
        autoencoder=IdentityAutoencoderParams(type="identity"),
        backbone=SimpleNamespace(patch=patch),
    )


def test_problems():
    assert list(PARAMS.problems(_spec((3, 32, 32), 2))) == []
    probs = list(PARAMS.problems(_spec((3, 32, 30), 4)))
    assert [p for p, _ in probs] == ["backbone.patch"] and "30" in probs[0][1]
    probs = list(PARAMS.problems(_spec((32, 32), 2)))
    assert [p for p, _ in probs] == ["data"]


def test_identity_autoencoder():
    params = IdentityAutoencoderParams(type="identity")
    assert params.latent_shape((3, 28, 28)) == (3, 28, 28)
    ae = AUTOENCODERS.build(params)
    assert isinstance(ae, IdentityAutoencoder) and isinstance(ae, Autoencoder) and isinstance(ae, torch.nn.Module)
    x = torch.randn(2, 3, 4, 4)
    assert ae.encode(x) is x and ae.decode(x) is x
    assert list(ae.parameters()) == []
