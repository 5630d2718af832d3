"""Several processes of one job under PyTorch's own launcher, `torchrun` (never a scheduler of the kit's own):

    torchrun --standalone --nproc_per_node=N -m afs_kit -- train-extractors --preset P --run DIR \
        [--parallel budgets|data]

(the `--` keeps torchrun from reading the kit's `--run` as its own `--run-path`). Each process is one rank;
`init` joins the job's process group with `gloo` on the CPU and `nccl` on GPUs (rank r on cuda:LOCAL_RANK).
Rank 0 alone takes the run's lock, prints, and writes the files every rank shares (run.json, last.pt of a
shared model, metrics.json); a file only one rank makes (its own extractor) that rank writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from ..errors import BadInput


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of n items (the first n % size ranks hold one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # the collectives a stage uses; each a no-op for a world of one, which is also how a rank that works on its
    # own (`--parallel budgets`) calls them: World() there, so no rank waits for another that never comes
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the ranks."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.size

    def average_gradients(self, module: torch.nn.Module) -> None:
        """All-reduce the gradients of `module`'s parameters to their mean over the ranks."""
        if not self.distributed:
            return
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.size


def world() -> World:
    """This process's place in the job: torchrun's RANK, WORLD_SIZE and LOCAL_RANK (one process without them)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the job's process group when torchrun started several processes; returns (world, this rank's
    device): cuda:LOCAL_RANK for a CUDA job (nccl), the CPU otherwise (gloo)."""
    w = world()
    if not w.distributed:
        return w, device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # AFS_KIT_DIST_TIMEOUT (seconds; torch's 30 min by default): a worker restarted by torchrun whose peer never
        # connects fails after it, and torchrun restarts the job again, instead of waiting half an hour
        timeout = os.environ.get("AFS_KIT_DIST_TIMEOUT")
        timeout = datetime.timedelta(seconds=float(timeout)) if timeout else None
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **_restart_store(w, timeout),
                                **({"timeout": timeout} if timeout else {}))
    return world(), device


def _restart_store(w: World, timeout: datetime.timedelta | None) -> dict:
    """After torchrun restarts a job, the process group's keys under a prefix of this attempt's own.

    Restarted workers meet in the agent's store, which still holds the keys the killed attempt wrote (gloo's
    addresses of the old ranks, under the same "default_pg" names): a worker that read one before its peer wrote
    the new one connected to a dead port ("Connection refused") until the timeout, and the job was restarted again
    (here it used up 6 restarts under load). Empty (torch's own rendezvous) for a first attempt or outside torchrun."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), w.size, is_master=False,
                          **({"timeout": timeout} if timeout else {}))
    return {"store": dist.PrefixStore(f"afs-kit/attempt-{attempt}", store), "rank": w.rank, "world_size": w.size}


def check_parallel(mode: str, size: int, budgets, batch_size: int) -> None:
    """What a torchrun job of `size` processes can do, refused before anything is written."""
    if mode == "budgets" and size > len(budgets):
        raise BadInput(f"--parallel budgets with {size} processes for {len(budgets)} budget"
                       f"{'' if len(budgets) == 1 else 's'} would leave "
                       f"{size - len(budgets)} idle; start at most {len(budgets)} (--nproc_per_node) or use "
                       f"--parallel data")
    if mode == "data" and batch_size % size:
        raise BadInput(f"--parallel data keeps the global batch, extractor.batch_size={batch_size}, which the world "
                       f"size {size} does not divide; use a world size that divides it or --set extractor.batch_size")


def shutdown() -> None:
    """Leave the process group (its threads must not outlive the interpreter: an abort at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def job_lock(run_dir):
    """The run directory's lock for the whole job: rank 0 takes it and every rank learns whether it could, so
    a refused job stops on every rank with rank 0's message."""
    w = world()
    if not w.distributed:
        with run_dir.lock():
            yield
        return
    lock, failure = run_dir.lock(), None
    if w.main:
        try:
            lock.__enter__()
        except (RuntimeError, PermissionError, ValueError) as err:
            failure = err
    message = w.broadcast(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f"rank 0 could not lock the run ({message})")
    try:
        yield
        w.barrier()  # no rank leaves (and rank 0 does not unlock) while another still works
    finally:
        if w.main:
            lock.__exit__(None, None, None)
