"""Data loading whose sample order does not depend on how many processes run.

The training data is one infinite *sample stream*: the concatenation of per-epoch orders
``perm(seed + 0), perm(seed + 1), ...`` over ``range(num_samples)``, where ``perm(s)`` is
``torch.randperm(num_samples, generator=torch.Generator().manual_seed(s))`` (or ``arange`` when
``shuffle=False``). Epoch boundaries are not batch boundaries: a global batch that runs past the
end of an epoch continues with the next epoch's order, so no sample is ever dropped.

Cutting the stream (``G = global_batch``, ``A = grad_accum``, ``W = world_size``)::

    optimizer step s      = stream[s*G : (s+1)*G]
    micro-batch m of s    = stream[s*G + m*M : s*G + (m+1)*M]          M = G // A
    rank r's share        = micro-batch[r*P : (r+1)*P]                 P = M // W

Rank ``r`` yields its share of every micro-batch in order (A per optimizer step). The union over
ranks of micro-batch m of step s is therefore the same for every world size, which makes a run's
data order — and, up to reduction order, its losses — independent of the GPU count.

``GlobalBatchSampler`` is a batch sampler (it yields lists of dataset indices) with
``state_dict()``/``load_state_dict()``, so ``torchdata.stateful_dataloader.StatefulDataLoader``
saves and restores the exact stream position, also with worker processes (see ``build_loader``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from zoo.core.protocols import epoch_indexed

# torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecated: a warning on every iterator, harmless.
warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated.*", category=UserWarning)

__all__ = ["GlobalBatchSampler", "build_loader", "collate_pairs", "restore_loader", "sampler_state"]


class GlobalBatchSampler:
    """Infinite, rank-aware batch sampler over a fixed-size map-style dataset.

    Args:
        num_samples: dataset length N (> 0).
        global_batch: samples per optimizer step over all ranks and micro-batches (G).
        grad_accum: micro-batches per optimizer step (A).
        rank, world_size: this process and the number of processes (W).
        seed: epoch ``e`` uses the permutation seeded with ``seed + e``.
        shuffle: if False every epoch is ``0, 1, ..., N-1``.

    Each ``next()`` yields a ``list[int]`` of ``G // (A * W)`` dataset indices: this rank's part
    of the next micro-batch. Requires ``G % (A * W) == 0``.

    State: the sampler is a *cursor* into the stream. ``__iter__`` continues from the cursor
    (a fresh sampler starts at 0; after ``load_state_dict`` it starts at the loaded position),
    and the cursor advances as batches are drawn. With loader workers the loader draws ahead of
    what the training loop has consumed (prefetch); that is why the loader, not the sampler,
    is what you checkpoint: ``StatefulDataLoader.state_dict()`` stores the sampler state as it
    was right after drawing the last batch that was actually returned. Keep one iterator over
    the loader for the whole run; a second ``iter(loader)`` on the same loader continues from the
    cursor and so skips batches that were prefetched but never returned.

    ``state_dict()`` records the position as ``samples_seen`` — samples consumed by *all* ranks
    together — so a state saved with one world size (or accumulation split) can be loaded with
    another, as long as the position falls on a micro-batch boundary of the new split.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        epoch_indexed: bool = False,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if global_batch <= 0 or grad_accum <= 0 or world_size <= 0:
            raise ValueError(
                f"global_batch, grad_accum and world_size must be positive, got "
                f"{global_batch}, {grad_accum}, {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if global_batch % (grad_accum * world_size) != 0:
            raise ValueError(
                f"global_batch ({global_batch}) must be divisible by grad_accum * world_size "
                f"({grad_accum} * {world_size} = {grad_accum * world_size})"
            )
        self.num_samples = int(num_samples)
        self.global_batch = int(global_batch)
        self.grad_accum = int(grad_accum)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch_indexed = bool(epoch_indexed)  # yield epoch * N + i: datasets that draw per epoch (posteriors)
        self.micro_batch = self.global_batch // self.grad_accum  # all ranks together
        self.per_rank = self.micro_batch // self.world_size  # what this rank yields per next()
        self._micro_batches = 0  # micro-batches drawn so far (the cursor)
        self._cache: dict[int, torch.Tensor] = {}  # epoch -> order (at most two kept)

    # ----------------------------------------------------------------------------------- stream
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch``: int64 tensor of shape ``(num_samples,)``."""
        order = self._cache.get(epoch)
        if order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_samples, generator=g)
            else:
                order = torch.arange(self.num_samples)
            for old in [e for e in self._cache if e < epoch - 1]:
                del self._cache[old]
            self._cache[epoch] = order
        return order

    def stream(self, start: int, length: int) -> list[int]:
        """Dataset indices at stream positions ``[start, start + length)``."""
        out: list[int] = []
        pos, end = start, start + length
        while pos < end:
            epoch, off = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - off)
            order = self.epoch_order(epoch)[off : off + take]
            out.extend((order + epoch * self.num_samples if self.epoch_indexed else order).tolist())
            pos += take
        return out

    def micro_batch_indices(self, k: int) -> list[int]:
        """This rank's part of global micro-batch ``k`` (= step ``k // grad_accum``, micro
        ``k % grad_accum``)."""
        return self.stream(k * self.micro_batch + self.rank * self.per_rank, self.per_rank)

    # --------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[list[int]]:
        while True:
            k = self._micro_batches
            batch = self.micro_batch_indices(k)
            # Advance *before* yielding: when the loader calls state_dict() right after next()
            # returned this batch, the state must already say "this batch is consumed".
            self._micro_batches = k + 1
            yield batch

    @property
    def samples_seen(self) -> int:
        """Stream position: samples drawn by all ranks together."""
        return self._micro_batches * self.micro_batch

    def state_dict(self) -> dict[str, Any]:
        """``{"samples_seen": int, "num_samples": int, "seed": int, "shuffle": bool}``."""
        return {
            "samples_seen": self.samples_seen,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Move the cursor to ``state["samples_seen"]``. The stream itself (N, seed, shuffle)
        must match; world size and accumulation may differ if the position is a multiple of the
        new micro-batch size."""
        for key in ("num_samples", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data stream mismatch: saved {key}={state[key]!r}, now {getattr(self, key)!r}"
                )
        seen = int(state["samples_seen"])
        if seen % self.micro_batch != 0:
            raise ValueError(
                f"saved position {seen} is not a multiple of the micro-batch size "
                f"{self.micro_batch} (global_batch {self.global_batch} / grad_accum {self.grad_accum})"
            )
        self._micro_batches = seen // self.micro_batch

    def __repr__(self) -> str:
        return (
            f"GlobalBatchSampler(N={self.num_samples}, G={self.global_batch}, A={self.grad_accum}, "
            f"rank={self.rank}/{self.world_size}, seed={self.seed}, shuffle={self.shuffle}, "
            f"samples_seen={self.samples_seen})"
        )


def _as_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    return torch.as_tensor(v)


def collate_pairs(items: Sequence[tuple[Any, Any]]) -> tuple[Any, torch.Tensor]:
    """Collate ``(x, y)`` pairs: ``x`` tensors/arrays of shape ``(C, H, W)`` (any shared shape)
    become one float32 tensor ``(B, C, H, W)`` -- or, for multi-stream samples (dicts of tensors by stream
    name), a dict of such batches; ``y`` ints (or 0-d tensors) become int64 ``(B,)``.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    try:
        xs, ys = zip(*items)
    except (TypeError, ValueError) as e:
        raise TypeError("collate_pairs expects dataset items that are (x, y) pairs") from e
    if isinstance(xs[0], dict):
        x: Any = {k: torch.stack([_as_tensor(v[k]) for v in xs]).to(torch.float32) for k in xs[0]}
    else:
        x = torch.stack([_as_tensor(v) for v in xs]).to(torch.float32)
    y = torch.stack([_as_tensor(v).reshape(()) for v in ys]).to(torch.int64)
    return x, y


def build_loader(
    dataset: Any,
    *,
    global_batch: int,
    grad_accum: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int,
    shuffle: bool = True,
    collate_fn: Callable[[list[Any]], Any] = collate_pairs,
    prefetch_factor: int | None = None,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """A resumable, infinite loader over a map-style ``dataset`` (``len`` + ``__getitem__``).

    Each iteration yields this rank's micro-batch ``(x, y)`` — ``x`` float32 ``(b, C, H, W)``,
    ``y`` int64 ``(b,)`` with ``b = global_batch // (grad_accum * world_size)`` — and the
    training loop takes ``grad_accum`` of them per optimizer step. Save ``loader.state_dict()``
    in the checkpoint and call ``restore_loader(fresh_loader, state)`` before iterating to
    continue exactly (also when ``num_workers`` changed, which plain ``load_state_dict`` rejects).
    Workers are persistent when ``num_workers > 0``.

    The loader gets its own ``torch.Generator`` seeded from ``(seed, rank)``: without one, every
    ``iter(loader)`` draws the worker base seed from the *global* torch RNG, which would shift
    the training RNG stream between a fresh and a resumed run. Worker seeds are thus
    deterministic per (seed, rank), and restored with the loader state.
    """
    sampler = GlobalBatchSampler(
        len(dataset), global_batch, grad_accum, rank, world_size, seed, shuffle=shuffle,
        epoch_indexed=epoch_indexed(dataset),
    )
    gen_seed = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, np.uint64)[0] >> 1)
    kwargs: dict[str, Any] = {"generator": torch.Generator().manual_seed(gen_seed)}
    if num_workers > 0:
        kwargs["persistent_workers"] = True
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return StatefulDataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        **kwargs,
    )


# ------------------------------------------------------------------------------------ resuming
# The keys below are StatefulDataLoader (torchdata 0.11) internals: a single-process state has
# the sampler state at top level, a multi-process one inside the snapshot of the main process.
def _saved_workers_and_sampler(state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    try:
        if "_index_sampler_state" in state:
            return 0, state["_index_sampler_state"]
        main = state["_snapshot"]["_main_snapshot"]
        return int(main["_num_workers"]), main["_index_sampler_state"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a StatefulDataLoader state with a GlobalBatchSampler ({e!r})") from None


def sampler_state(loader_state: dict[str, Any]) -> dict[str, Any]:
    """The ``GlobalBatchSampler`` state (``{"samples_seen": ...}``) inside a saved
    ``StatefulDataLoader.state_dict()``: the position of the last batch actually returned."""
    return _saved_workers_and_sampler(loader_state)[1]


def restore_loader(loader: StatefulDataLoader, state: dict[str, Any]) -> None:
    """Restore a saved loader state into a freshly built loader (before iterating it).

    Same ``num_workers``: ``loader.load_state_dict(state)``, which also restores the worker base
    seed. Different ``num_workers`` (StatefulDataLoader would refuse the state): only the sampler
    position is restored, so the batches are the same, but anything random *inside* workers
    (augmentations seeded per worker) is not reproduced; a warning says so.
    """
    saved_workers, sampler = _saved_workers_and_sampler(state)
    if saved_workers == loader.num_workers:
        loader.load_state_dict(state)
        return
    warnings.warn(
        f"loader state was saved with num_workers={saved_workers}, now {loader.num_workers}: "
        "restoring the sample position only (worker-side randomness will differ)",
        stacklevel=2,
    )
    loader.batch_sampler.load_state_dict(sampler)
