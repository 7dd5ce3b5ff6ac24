"""Many processes, one job: `torchrun --nproc_per_node=N train.py ...` starts N copies of a script;
each embeds a share of the texts, balanced by tokens, and rank 0 trains the head. A plain run is
world size 1, and every function here is then a no-op.
"""

import atexit
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def distributed(device):
    """(rank, world size, this process's device) under torchrun, starting PyTorch's process group
    once; (0, 1, device) in a plain run. One GPU per process and NCCL when embedding on CUDA, else
    gloo between CPU processes (also on a machine that has GPUs, with --device cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            gpus = torch.cuda.device_count()
            if per_node > gpus:  # before any work, not "invalid device ordinal" from deep inside
                raise ValueError(f"{per_node} processes on this node but {gpus} GPU(s): use "
                                 f"--nproc_per_node={gpus} or fewer, or --device cpu")
            torch.cuda.set_device(local)
        # Ranks wait for each other at the end of embedding, which can take hours on one slow rank.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(hours=12))
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), world, torch.device("cuda", local) if device.type == "cuda" else device


def rank_and_world():
    """(rank, world size) of the process group distributed() started; (0, 1) in a plain run."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def balance(token_counts, world):
    """Deal items to ranks, longest first, each to the rank with the fewest tokens so far."""
    shares, totals = [[] for _ in range(world)], [0] * world
    for i in sorted(range(len(token_counts)), key=lambda i: -token_counts[i]):
        r = totals.index(min(totals))
        shares[r].append(i)
        totals[r] += token_counts[i]
    return shares


def barrier(world):
    """Wait for every rank (nothing to wait for in a plain run)."""
    if world > 1:
        dist.barrier()


def gather(item, world):
    """[every rank's item], in rank order."""
    if world == 1:
        return [item]
    every = [None] * world
    dist.all_gather_object(every, item)
    return every
