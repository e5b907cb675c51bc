"""``linear_probe``: how linearly separable the classes are in a backbone's hidden states.

Real samples of the run's data (``num_train`` from the train split, ``num_test`` from the eval split) are
encoded, noised to a fixed time ``t`` with fixed noise (RF time: ``t = 0`` is clean), passed through the
EMA backbone up to block ``block`` (with the null label, so the label cannot leak in), mean-pooled over
tokens, standardised with the training statistics, and a linear classifier is fitted in closed form
(ridge regression onto one-hot targets, ``ridge`` x identity added to the Gram matrix). The metric is its
top-1 accuracy on the test samples. Deterministic: the noise comes from a generator seeded with ``seed``.

Unlike the sample metrics, it reads the model: ``metric.evaluate_model(graph) -> {"linear_probe_b{k}": acc}``
(``linear_probe_b{k}_t{t}`` when ``t`` is not 0).
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Literal

import torch
from pydantic import Field

from registry.kinds import DATASETS, METRICS
from zoo.core.params import ZooParams
from zoo.core.protocols import Metric
from zoo.core.time import interpolate


class LinearProbeMetricParams(ZooParams):
    type: Literal["linear_probe"] = Field(..., description="Linear-probe accuracy of frozen EMA hidden states.")
    block: int = Field(..., ge=1, description="1-based block whose output is probed (Self-Flow probes every block; "
                                              "[SF-paper] Fig. 4b).")
    t: float = Field(0.0, ge=0, le=1, description="RF time the inputs are noised to before probing (0 = clean).")
    num_train: int = Field(2000, gt=0, description="Real training samples the classifier is fitted on.")
    num_test: int = Field(1000, gt=0, description="Real held-out samples it is scored on.")
    ridge: float = Field(1e-2, gt=0, description="Ridge regulariser of the closed-form fit (on standardised features).")
    seed: int = Field(0, description="Seed of the noise added at time t.")
    batch_size: int = Field(256, gt=0, description="Forward batch size.")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        if spec.data.num_classes < 2:
            yield "", "linear_probe needs class labels (data.num_classes >= 2)"
        if self.block > spec.backbone.depth:
            yield "", f"linear_probe block {self.block} > backbone depth {spec.backbone.depth}"


@METRICS.register
class LinearProbe(Metric):
    Params = LinearProbeMetricParams
    uses_model: ClassVar[bool] = True

    @staticmethod
    def value_name(p: LinearProbeMetricParams) -> str:
        """``linear_probe_b<block>`` (``_t<t>`` when probing at ``t > 0``)."""
        return f"linear_probe_b{p.block}" + (f"_t{p.t:g}" if p.t else "")

    @classmethod
    def directions(cls, params: LinearProbeMetricParams) -> dict[str, bool]:
        return {cls.value_name(params): True}

    def __init__(self, params: LinearProbeMetricParams, data_params: Any, device: torch.device | str = "cpu"):
        self.params, self.device = params, torch.device(device)
        self.train_set = DATASETS.build(data_params, split="train")
        self.test_set = DATASETS.build(data_params, split="eval")

    @torch.no_grad()
    def _features(self, graph: Any, dataset: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-pooled block features ``(n, D)`` (float64) and labels ``(n,)``."""
        p = self.params
        net = graph.ema.module if graph.ema is not None else graph.backbone
        gen = torch.Generator().manual_seed(seed)
        feats, labels = [], []
        n = min(n, len(dataset))
        for i in range(0, n, p.batch_size):
            xs, ys = zip(*(dataset[j] for j in range(i, min(i + p.batch_size, n))))
            tokens = graph.to_tokens(torch.stack(xs), None).x0                      # (b, N, P)
            noise = torch.randn(tokens.shape, generator=gen).to(tokens.device)
            t = torch.full((tokens.shape[0],), p.t, device=tokens.device)
            with graph.autocast():
                h = net(interpolate(tokens, noise, t), t, None, taps=(p.block,), stop_after=p.block).features[p.block]
            feats.append(h.float().mean(dim=1).double().cpu())
            labels.append(torch.tensor(ys))
        return torch.cat(feats), torch.cat(labels)

    def evaluate_model(self, graph: Any) -> dict[str, float]:
        p = self.params
        xtr, ytr = self._features(graph, self.train_set, p.num_train, p.seed)
        xte, yte = self._features(graph, self.test_set, p.num_test, p.seed + 1)
        mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
        xtr1, xte1 = torch.cat([xtr, torch.ones(len(xtr), 1, dtype=xtr.dtype)], 1), \
            torch.cat([xte, torch.ones(len(xte), 1, dtype=xte.dtype)], 1)
        k = int(max(ytr.max(), yte.max())) + 1
        targets = torch.nn.functional.one_hot(ytr, k).double()
        gram = xtr1.T @ xtr1 + p.ridge * len(xtr1) * torch.eye(xtr1.shape[1], dtype=xtr1.dtype)
        w = torch.linalg.solve(gram, xtr1.T @ targets)                                # (D + 1, k)
        acc = (xte1 @ w).argmax(1).eq(yte).double().mean().item()
        return {self.value_name(p): acc}
