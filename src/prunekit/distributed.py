"""Several processes on one search, through torch.distributed (launched by ``torchrun``).

``torchrun --nproc_per_node N -m prunekit.cli prune ...`` starts N copies of the command with ``RANK`` /
``WORLD_SIZE`` / ``MASTER_ADDR`` set; :func:`world` joins them into one process group (gloo on the CPU, NCCL when
the command runs on CUDA, each rank on its own GPU). Every rank loads the model and the calibration windows and
follows the same control flow; only the expensive independent pieces are split:

- the candidates of a greedy depth step (BlockPruner, SLEB): each rank scores every N-th candidate of the step's
  order, the scores are gathered, and every rank picks the same winner;
- the K mask samples of a policy-gradient step: every rank draws the same K masks (same seeds), computes the
  losses of its contiguous share, and the losses are gathered in sample order;
- the calibration mini-batches of the layer-wise methods (SlimGPT, Wanda-sp, FLAP, LLM-BIP): each rank runs every
  N-th batch, and the batches' statistics are exchanged and folded in batch order (``calibration.exchange``).

Results equal the one-process ones: the winner of a step is the minimum over all candidates whatever the split
(a candidate abandoned by its rank's early-abandon bound has a sum above that rank's best complete sum, so it
cannot be the minimum), each mask's loss is computed by the same forward, and the statistics are summed in the
one-process order. Only rank 0 writes files (the checkpoint, the search state, reports) and prints; the others
finish without output.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from prunekit.errors import PrunekitError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


def world(device: torch.device | str | None = None) -> World:
    """This process's place in the process group, joining it on first use when launched by torchrun."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    if not dist.is_available():
        raise PrunekitError("this torch build has no torch.distributed; run one process")
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if cuda else "gloo")
        except (RuntimeError, ValueError) as error:
            raise PrunekitError(f"cannot join the torchrun process group ({str(error).splitlines()[0]})") from None
    return World(dist.get_rank(), dist.get_world_size())


def _gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, value)
    except RuntimeError as error:
        raise _group_failed(error) from None
    return gathered


def all_gather_tensor(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor`` (same shape and dtype on all), in rank order."""
    import torch.distributed as dist

    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    try:
        dist.all_gather(gathered, tensor.contiguous())
    except RuntimeError as error:
        raise _group_failed(error) from None
    return gathered


def _group_failed(error: RuntimeError) -> PrunekitError:
    """The one-line error of a collective that failed because another process died or left."""
    return PrunekitError(f"a process of the torchrun group failed or left ({str(error).splitlines()[0]}); no output "
                         "was written; rerun the command (resumable searches continue from their state)")


def split_map(function: Callable[[Sequence[T]], list[R]], items: Sequence[T], strided: bool = True) -> list[R]:
    """``function(items)`` computed with the items split across the processes, results in the items' order.

    ``strided``: rank r takes items r, r + N, ... (balances a ranking whose costly items come first); otherwise
    contiguous shares. One process: ``function(items)`` itself.
    """
    here = world()
    if not here.active:
        return function(items)
    positions = list(range(len(items)))
    share = positions[here.rank::here.size] if strided else positions[contiguous_share(len(positions), here)]
    results = function([items[position] for position in share])
    if len(results) != len(share):
        raise PrunekitError("a distributed share returned the wrong number of results")
    merged: dict[int, R] = {}
    for shares, values in _gather((share, results)):
        merged.update(zip(shares, values, strict=True))
    return [merged[position] for position in positions]


def contiguous_share(count: int, here: World) -> slice:
    """This process's contiguous share of ``count`` items (the first ``count % size`` processes get one more)."""
    size, extra = divmod(count, here.size)
    start = here.rank * size + min(here.rank, extra)
    return slice(start, start + size + (here.rank < extra))


def leader() -> bool:
    """Whether this process writes files and prints (always, without torchrun)."""
    return world().leader


def barrier() -> None:
    if world().active:
        import torch.distributed as dist

        dist.barrier()
