"""Process-group setup and the one place that knows which rank owns what.

Rank 0 owns everything that is printed, logged or written to shared files; helpers here make that
explicit (``is_main()``) instead of scattering ``if rank == 0`` tests.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from shardtune.utils import heartbeat
from shardtune.utils.io import atomic_write_text


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or group_up()


_INFO = DistInfo()
_SET_UP = False  # before setup(), the launcher's RANK variable says which process owns the terminal
_PATIENT_GROUP = None  # gloo group with a long timeout, for waits on rank 0 (see setup)
_HEARTBEAT = None
_TIMEOUT_S = 0.0  # the process group's timeout (setup)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def under_elastic_agent() -> bool:
    """Started by torchrun's elastic agent (torchrun or ``shardtune run``), which sets this for every worker."""
    return "TORCHELASTIC_RUN_ID" in os.environ


# `shardtune run` passes its workers a folder for their notes to it (shardtune/launch.py says why a folder)
LAUNCHER_NOTES_ENV = "SHARDTUNE_LAUNCHER_NOTES"


def tell_launcher(name: str, note: dict) -> bool:
    """Write ``note`` (JSON) as ``name`` into the launcher's notes folder, atomically; False when there is none
    (plain torchrun, one process)."""
    folder = os.environ.get(LAUNCHER_NOTES_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    atomic_write_text(Path(folder) / name, json.dumps(note) + "\n")
    return True


def forget_launcher_note(name: str) -> None:
    """Remove this process's note of an earlier attempt (a worker group restarted by --max_restarts)."""
    folder = os.environ.get(LAUNCHER_NOTES_ENV)
    if folder:
        Path(folder, name).unlink(missing_ok=True)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


ALLOCATOR_SETTING = "expandable_segments:True"


def configure_cuda_allocator() -> str:
    """Expandable segments for PyTorch's CUDA caching allocator, unless the user configured it.

    With fixed-size segments, FSDP's all-gather buffers and activation-checkpointing recomputation
    leave many partly used blocks: 68 GB reserved for 24 GB allocated was measured on Llama-3.2-1B
    (H200). Expandable segments grow one mapping per stream instead, so reserved stays close to
    allocated. Must run before the first CUDA allocation; returns a note for the start-up log.
    """
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if os.environ.get(name):
            return f"CUDA allocator: {name}={os.environ[name]} (yours)"
    if torch.cuda.is_initialized():
        return "CUDA allocator: default (CUDA was started before shardtune could set expandable segments)"
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTING
    return f"CUDA allocator: PYTORCH_CUDA_ALLOC_CONF={ALLOCATOR_SETTING} (set PYTORCH_CUDA_ALLOC_CONF to override)"


DEFAULT_TIMEOUT_S = 300.0  # a hung rank ends the job after 5 minutes (torch's own default is 10-30)
PATIENT_TIMEOUT = datetime.timedelta(hours=2)  # waits for rank 0's one-rank work: tokenising, exporting


def timeout_s(requested: Optional[float] = None) -> float:
    """--dist_timeout_s, else $SHARDTUNE_PG_TIMEOUT_S, else DEFAULT_TIMEOUT_S."""
    return requested or float(os.environ.get("SHARDTUNE_PG_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def setup(enable_fsdp: bool, timeout: Optional[float] = None) -> DistInfo:
    """Initialise the process group when running under torchrun with --enable_fsdp.

    The backend follows the device: NCCL on GPUs, gloo on CPU. Collectives time out after ``timeout_s()``
    (a few minutes) so that a hung rank ends the job instead of blocking it; a heartbeat (utils/heartbeat.py)
    then names the rank that stopped answering. Waits for work that rank 0 does alone (``barrier``,
    ``broadcast_object``) use a separate gloo group with a long timeout.
    """
    global _INFO, _SET_UP, _PATIENT_GROUP, _HEARTBEAT, _TIMEOUT_S
    _SET_UP = True
    _TIMEOUT_S = timeout_s(timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if enable_fsdp and launched_by_torchrun():
        if not dist.is_initialized():
            # On GPUs, NCCL for CUDA tensors plus gloo for CPU ones: FSDP CPU offload keeps shards (and
            # their gradient-norm reductions) in host memory, and checkpoints gather into host memory.
            backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_TIMEOUT_S),
                                    device_id=device if device.type == "cuda" else None)
        _INFO = DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)
        if _INFO.world_size > 1:
            _PATIENT_GROUP = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
            _HEARTBEAT = heartbeat.start(_INFO.rank, _INFO.world_size)
    else:
        _INFO = DistInfo(0, 0, 1, device)
    return _INFO


def describe_timeout(exc: BaseException) -> Optional[str]:
    """For a collective that timed out: which rank stopped answering (None: ``exc`` is no timeout)."""
    if _INFO.world_size < 2 or not heartbeat.is_timeout(exc):
        return None
    who = _HEARTBEAT.silent_ranks() if _HEARTBEAT is not None else "no heartbeat to tell which rank"
    return f"a collective timed out after {_TIMEOUT_S:.0f} s (--dist_timeout_s): {who}"


def stopped_peers() -> Dict[int, int]:
    """After a timeout: rank -> pid of the ranks on this host that are stopped (SIGSTOP, state T). Nothing but
    SIGKILL ends them: the launcher sends SIGTERM, which a stopped process never sees, and SIGKILLs only after its
    30 s shutdown grace (utils/heartbeat.py). :func:`end_peers` does it at once."""
    return _HEARTBEAT.stopped_local_ranks() if _HEARTBEAT is not None else {}


def end_peers(stopped: Dict[int, int]) -> None:
    heartbeat.kill(stopped.values())


def info() -> DistInfo:
    return _INFO


def is_main() -> bool:
    return _INFO.is_main if _SET_UP else env_rank() == 0


def group_up() -> bool:
    """Whether a process group is initialised (a one-process run has none; DCP then works without one)."""
    return dist.is_available() and dist.is_initialized()


def multi_rank() -> bool:
    """Whether collectives reach other ranks: a process group with more than one rank."""
    return group_up() and dist.get_world_size() > 1


def barrier() -> None:
    if group_up():
        dist.barrier(group=_PATIENT_GROUP)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place, returned for chaining). A no-op on one process."""
    if multi_rank():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_on_host(values: Sequence[float]) -> List[float]:
    """Sum a few host-side numbers over ranks (collective under a process group). The tensor stays in host memory,
    so the sum travels through gloo (the default group's CPU backend) and, unlike a GPU all-reduce read back with
    ``.tolist()``, does not wait for the GPU's queue to drain: the device keeps working on what was launched."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return all_reduce_sum(t).tolist()


def agree(value: int, device: torch.device = torch.device("cpu"), op: str = "max") -> int:
    """The largest (op="max") or smallest (op="min") of every rank's ``value``, on every rank: for a decision all
    ranks must take alike. Collective under a process group; ``value`` itself in one process. On the default
    ``device`` (the host) the GPU's queue is not drained (see :func:`sum_on_host`)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if group_up():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_object(obj):
    """Rank 0's Python object, on every rank."""
    if multi_rank():
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=_PATIENT_GROUP)
        return box[0]
    return obj


def on_rank0(fn: Callable[[], object], what: str = "prepare the run"):
    """Run ``fn`` on rank 0 only and return its (picklable) result on every rank: decisions that every rank
    must share (which checkpoint to resume, the run id, the data cache file) are made once.

    If rank 0 fails, the other ranks raise too (a ConfigError stays a ConfigError, with rank 0's message)
    instead of waiting in a collective that rank 0 never reaches.
    """
    if not multi_rank():
        return fn()
    from shardtune.errors import first_line

    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as exc:
            broadcast_object(("error", type(exc).__name__, first_line(exc)))
            raise
        broadcast_object(("ok", result))
        return result
    reply = broadcast_object(None)
    if reply[0] == "error":
        from shardtune.errors import ConfigError

        if reply[1] == "ConfigError":
            raise ConfigError(reply[2])
        raise RuntimeError(f"rank 0 failed to {what}: {reply[1]}: {reply[2]}")
    return reply[1]


def abort() -> None:
    """Leave the process group after an error that every rank raised (no barrier: nothing more to agree on)."""
    if group_up():
        dist.destroy_process_group()


def cleanup() -> None:
    global _PATIENT_GROUP, _HEARTBEAT
    if _HEARTBEAT is not None:
        _HEARTBEAT.stop()
        _HEARTBEAT = None
    if group_up():
        dist.barrier()
        dist.destroy_process_group()
    _PATIENT_GROUP = None
