"""GlobalBatchSampler / build_loader: world-size independence, epochs, exact resume."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from runtime.data import GlobalBatchSampler, build_loader, collate_pairs, restore_loader, sampler_state


class TinyImages:
    """In-memory map-style dataset: item i = (x (1, 2, 2) float filled with i, label i % 3)."""

    def __init__(self, n: int) -> None:
        self.x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.x[i], i % 3


def take(sampler: GlobalBatchSampler, n: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("G,A,W", [(8, 3, 1), (6, 4, 1), (12, 2, 4), (10, 1, 3)])
def test_divisibility_error(G, A, W):
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(20, G, A, 0, W, seed=0)


def test_bad_rank_and_sizes():
    with pytest.raises(ValueError):
        GlobalBatchSampler(10, 4, 1, 2, 2, seed=0)
    with pytest.raises(ValueError):
        GlobalBatchSampler(0, 4, 1, 0, 1, seed=0)


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_union_over_ranks_matches_single_rank(world_size, grad_accum):
    N, G, steps = 13, 8, 7  # N not a multiple of G: batches straddle epoch ends
    single = take(GlobalBatchSampler(N, G, grad_accum, 0, 1, seed=3), steps * grad_accum)
    per_rank = [take(GlobalBatchSampler(N, G, grad_accum, r, world_size, seed=3), steps * grad_accum)
                for r in range(world_size)]
    for k in range(steps * grad_accum):
        union = [i for r in range(world_size) for i in per_rank[r][k]]  # ranks in order
        assert union == single[k]
        assert all(len(per_rank[r][k]) == G // (grad_accum * world_size) for r in range(world_size))


def test_every_sample_once_per_epoch_and_no_loss_at_epoch_ends():
    N, G = 10, 4
    s = GlobalBatchSampler(N, G, 1, 0, 1, seed=7)
    stream = [i for b in take(s, 15) for i in b]  # 60 positions = 6 epochs
    for e in range(6):
        assert sorted(stream[e * N:(e + 1) * N]) == list(range(N))
    orders = [tuple(stream[e * N:(e + 1) * N]) for e in range(6)]
    assert len(set(orders)) > 1  # reshuffled per epoch
    assert orders[0] == tuple(torch.randperm(N, generator=torch.Generator().manual_seed(7)).tolist())
    # Same seed, same stream; other seed, other stream; no shuffle: arange.
    assert [i for b in take(GlobalBatchSampler(N, G, 1, 0, 1, seed=7), 15) for i in b] == stream
    assert [i for b in take(GlobalBatchSampler(N, G, 1, 0, 1, seed=8), 15) for i in b] != stream
    plain = [i for b in take(GlobalBatchSampler(N, G, 1, 0, 1, seed=7, shuffle=False), 5) for i in b]
    assert plain == list(range(10)) * 2


def test_global_batch_larger_than_dataset():
    s = GlobalBatchSampler(3, 8, 1, 0, 1, seed=0)
    b = take(s, 3)
    stream = [i for x in b for i in x]
    for e in range(8):
        assert sorted(stream[3 * e:3 * e + 3]) == [0, 1, 2]


def test_sampler_state_is_world_size_independent():
    N, G = 11, 8
    a = GlobalBatchSampler(N, G, 2, 0, 1, seed=1)
    take(a, 5)  # 5 micro-batches of 4 samples
    st = a.state_dict()
    assert st["samples_seen"] == 20
    # Resume the same position with 2 ranks: their union continues the single-rank stream.
    rest_single = take(a, 4)
    parts = []
    for r in range(2):
        b = GlobalBatchSampler(N, G, 2, r, 2, seed=1)
        b.load_state_dict(st)
        parts.append(take(b, 4))
    assert [parts[0][k] + parts[1][k] for k in range(4)] == rest_single
    with pytest.raises(ValueError, match="stream mismatch"):
        GlobalBatchSampler(N, G, 2, 0, 1, seed=2).load_state_dict(st)
    with pytest.raises(ValueError, match="multiple"):
        GlobalBatchSampler(N, 24, 1, 0, 1, seed=1).load_state_dict(st)


def test_collate_pairs():
    items = [(np.ones((3, 4, 5), np.uint8), 2), (torch.zeros(3, 4, 5, dtype=torch.float64), torch.tensor(1))]
    x, y = collate_pairs(items)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert y.tolist() == [2, 1] and y.dtype == torch.int64


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_state_round_trip(num_workers, world_size):
    ds = TinyImages(13)
    kw = dict(global_batch=8, grad_accum=2, world_size=world_size, seed=5, num_workers=num_workers)
    k, more = 5, 7
    for rank in range(world_size):
        ref = build_loader(ds, rank=rank, **kw)
        it = iter(ref)
        first = [next(it) for _ in range(k)]
        state = ref.state_dict()
        expected = [next(it) for _ in range(more)]

        fresh = build_loader(ds, rank=rank, **kw)
        fresh.load_state_dict(state)
        got = list(itertools.islice(iter(fresh), more))
        for (xe, ye), (xg, yg) in zip(expected, got, strict=True):
            assert torch.equal(xe, xg) and torch.equal(ye, yg)
        # The batches are what the sampler says, with the collated shapes.
        sampler = GlobalBatchSampler(13, 8, 2, rank, world_size, seed=5)
        want = take(sampler, k + more)
        b = 8 // (2 * world_size)
        for (x, y), idx in zip(first + expected, want, strict=True):
            assert x.shape == (b, 1, 2, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert x[:, 0, 0, 0].long().tolist() == idx
            assert y.tolist() == [i % 3 for i in idx]


def test_loader_does_not_touch_global_rng():
    ds = TinyImages(6)
    torch.manual_seed(0)
    loader = build_loader(ds, global_batch=2, grad_accum=1, rank=0, world_size=1, seed=0, num_workers=0)
    next(iter(loader))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.parametrize("saved,now", [(0, 0), (2, 2), (0, 2), (2, 0)])
def test_restore_loader_across_worker_counts(saved, now):
    ds = TinyImages(9)
    kw = dict(global_batch=4, grad_accum=1, rank=0, world_size=1, seed=2)
    ref = build_loader(ds, num_workers=saved, **kw)
    it = iter(ref)
    for _ in range(4):
        next(it)
    state = ref.state_dict()
    assert sampler_state(state)["samples_seen"] == 16  # position of what was returned, not prefetched
    expected = [next(it)[0] for _ in range(5)]
    fresh = build_loader(ds, num_workers=now, **kw)
    if saved == now:
        restore_loader(fresh, state)
    else:
        with pytest.warns(UserWarning, match="position only"):
            restore_loader(fresh, state)
    got = [x for x, _ in itertools.islice(iter(fresh), 5)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_epoch_indexed_stream_tells_draws_apart():
    """With ``epoch_indexed`` the sampler yields ``epoch * N + i``: the same samples as the plain stream, with the
    epoch on top (datasets that draw a fresh posterior sample per epoch read it with ``divmod``)."""
    plain = GlobalBatchSampler(5, 5, 1, 0, 1, seed=3)
    indexed = GlobalBatchSampler(5, 5, 1, 0, 1, seed=3, epoch_indexed=True)
    a, b = plain.stream(0, 15), indexed.stream(0, 15)
    assert [x % 5 for x in b] == a
    assert [x // 5 for x in b] == [0] * 5 + [1] * 5 + [2] * 5
