"""Sample order and seeds: the per-epoch, per-rank order of the files, the shard of this process, and the seed
mixing every random stream of the loaders derives from.

Every epoch draws one permutation of all files (seeded by ``seed`` and the epoch, the same on every rank), pads it
by repeating its first files to a multiple of ``num_shards * batch_size`` and deals it out round-robin, so each
file is seen exactly once per epoch across ranks and every rank takes the same number of steps.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def mix_seeds(*values: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms, unlike hash())."""
    digest = hashlib.blake2b(b",".join(str(int(v)).encode() for v in values), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(
    num_files: int, batch_size: int, *, epoch: int, seed: int, shard_id: int, num_shards: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's samples for one epoch: file indices [steps * batch_size] int64 and a validity flag (False for the
    padding that evens out the ranks). Across ranks, the valid entries are a permutation of range(num_files)."""
    if num_files <= 0:
        raise ValueError("no files to order")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} must lie in [0, num_shards={num_shards})")
    if shuffle:
        perm = np.random.default_rng(mix_seeds(seed, epoch, 0x5EED)).permutation(num_files)
    else:
        perm = np.arange(num_files)
    per_step = batch_size * num_shards
    steps = -(-num_files // per_step)
    pad = steps * per_step - num_files
    # Padding repeats the first files of the permutation (np.resize cycles when pad exceeds num_files).
    order = np.concatenate([perm, np.resize(perm, pad)]).astype(np.int64)
    valid = np.arange(order.size) < num_files
    return order[shard_id::num_shards], valid[shard_id::num_shards]


def resolve_shards(shard_id: int | None, num_shards: int | None) -> tuple[int, int]:
    """(shard_id, num_shards), each defaulting to torch.distributed's global rank and world size when it is
    initialised (0 and 1 otherwise)."""
    if shard_id is None or num_shards is None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        shard_id = shard_id if shard_id is not None else (dist.get_rank() if initialised else 0)
        num_shards = num_shards if num_shards is not None else (dist.get_world_size() if initialised else 1)
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"need 0 <= shard_id < num_shards, got shard_id={shard_id}, num_shards={num_shards}")
    return shard_id, num_shards
