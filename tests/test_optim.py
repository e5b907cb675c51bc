"""EMA update and learning-rate application against their formulas."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from runtime.optim import EMA


@pytest.mark.parametrize("warmup", [0, 10])
def test_ema_update_matches_formula(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9, warmup_steps=warmup)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # changes the BatchNorm running stats (buffers are copied, not averaged)
        d = min(0.9, (1 + n) / (warmup + n)) if warmup else 0.9
        assert ema.decay_at(n) == pytest.approx(d)
        for name, p in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach()
        ema.update(model)
        got = ema.state_dict()
        for name, _ in model.named_parameters():
            assert torch.allclose(got[name], expected[name], atol=1e-6), (n, name)
        for name, b in model.named_buffers():
            assert torch.equal(got[name], b)
    assert ema.updates == 5 and not any(p.requires_grad for p in ema.module.parameters())
