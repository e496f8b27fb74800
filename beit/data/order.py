"""Sample order and seeds: the per-epoch, per-rank order of the files, the shard of this process, and the seed
mixing every random stream of the loaders derives from.

Every epoch draws one permutation of all files (seeded by ``seed`` and the epoch, the same on every rank), pads it
by repeating its first files to a multiple of ``num_shards * batch_size`` and deals it out round-robin, so each
file is seen exactly once per epoch across ranks and every rank takes the same number of steps.

Repeated augmentation (``repeats`` k > 1, DeiT's ``RASampler`` on this grid): each file of the same permutation is
repeated k times in a row before the round-robin deal, and the epoch keeps only ``num_files // (num_shards *
batch_size)`` whole steps, so it is about as long as without repetition and covers about 1/k of the files, each k
times.
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
    num_files: int,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    shard_id: int,
    num_shards: int,
    shuffle: bool = True,
    repeats: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's samples for one epoch: file indices [steps * batch_size] int64 and a validity flag (False for the
    padding that evens out the ranks). Across ranks, the valid entries are a permutation of range(num_files).

    ``repeats`` k > 1: the permutation with each file repeated k times in a row (file p[0] k times, then p[1] k
    times, ...), dealt round-robin, each rank keeping its first ``num_files // (num_shards * batch_size)`` steps
    (``repeated_steps``): the first ``steps * num_shards * batch_size`` entries of the repeated permutation, every
    one valid. The k copies of a file sit in consecutive dealt positions, so they go to k different ranks when
    ``num_shards >= k``; on fewer ranks, copies share a rank in consecutive slots (the same batch, or two adjacent
    ones where they straddle a batch boundary). The last kept file may have fewer than k copies."""
    if num_files <= 0:
        raise ValueError("no files to order")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} must lie in [0, num_shards={num_shards})")
    repeated = repeats != 1
    if repeated:
        kept_steps = repeated_steps(num_files, batch_size, num_shards, repeats)  # checks repeats and num_files
    if shuffle:
        perm = np.random.default_rng(mix_seeds(seed, epoch, 0x5EED)).permutation(num_files)
    else:
        perm = np.arange(num_files)
    per_step = batch_size * num_shards
    if repeated:
        # DeiT pads the repeated list to a multiple of the ranks; the kept prefix (steps * per_step <= num_files
        # <= repeats * num_files entries) never reaches that padding, so no slot is padding.
        order = np.repeat(perm, repeats)[: kept_steps * per_step].astype(np.int64)
        return order[shard_id::num_shards], np.ones(kept_steps * batch_size, dtype=bool)
    steps = -(-num_files // per_step)
    pad = steps * per_step - num_files
    # Padding repeats the first files of the permutation (np.resize cycles when pad exceeds num_files).
    order = np.concatenate([perm, np.resize(perm, pad)]).astype(np.int64)
    valid = np.arange(order.size) < num_files
    return order[shard_id::num_shards], valid[shard_id::num_shards]


def repeated_steps(num_files: int, batch_size: int, num_shards: int, repeats: int) -> int:
    """Steps per epoch with repeated augmentation (``repeats`` > 1; ``repeats`` is checked to be a positive integer):
    ``num_files // (batch_size * num_shards)``, DeiT's
    ``len(dataset) // 256 * 256 // num_replicas`` samples per rank with ``batch_size * num_shards`` for its grid of
    256; an error when that is no step at all."""
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    steps = num_files // (batch_size * num_shards)
    if steps == 0:
        raise ValueError(
            f"repeated augmentation keeps whole steps of batch_size * num_shards = {batch_size * num_shards} "
            f"samples, but there are only {num_files}: use fewer ranks, a smaller batch or no repetition"
        )
    return steps


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
