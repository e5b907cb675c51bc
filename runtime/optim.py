"""Optimizer, learning rate and EMA from the spec's ``train`` section."""
from __future__ import annotations

import copy

import torch
from torch import nn

from registry.kinds import LR_SCHEDULES
from zoo.parallel import local_tensor


def build_optimizer(params: list[nn.Parameter], train, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; fused on CUDA. ``train``: the spec's TrainSettings."""
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                             weight_decay=train.weight_decay, fused=device.type == "cuda")


class LearningRate:
    """``lr(step)`` = base lr x schedule factor (warm-up included); a pure function of the step, so a
    resumed run needs no scheduler state."""

    def __init__(self, train):
        self.base, self.total, self.warmup = train.lr, train.steps, train.warmup_steps
        self.schedule = LR_SCHEDULES.build(train.lr_schedule)

    def __call__(self, step: int) -> float:
        return self.base * self.schedule.factor(step, self.total, self.warmup)

    def apply(self, opt: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for g in opt.param_groups:
            g["lr"] = lr
        return lr


class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    ``decay_at(n) = min(decay, (1 + n) / (warmup_steps + n))`` for the n-th update when ``warmup_steps > 0``.
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup = decay, warmup_steps
        self.updates = 0

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (self.warmup + n)) if self.warmup > 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay_at(self.updates)
        # sharded modules (train.parallel fsdp2/hsdp): each rank updates its own shards, nothing is gathered
        ema_p = [local_tensor(p) for p in self.module.parameters()]
        src_p = [local_tensor(p.detach()) for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for eb, b in zip(self.module.buffers(), model.buffers()):
            eb.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict, updates: int) -> None:
        self.module.load_state_dict(sd)
        self.updates = updates
