"""Data parallelism: a one-axis device mesh, and joining processes with `jax.distributed`.

Training shards the batch axis over the mesh axis ``"data"`` and replicates the parameters; XLA
inserts the gradient all-reduce. The same code runs on one CPU, on several devices of one host,
and on several hosts joined by `jax.distributed.initialize`, where `jax.devices()` lists the
devices of every process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"

# our own variables first; then the ones JAX's cluster detection reads by itself
ENV_COORDINATOR = "FLASHBAYES_COORDINATOR"
ENV_NUM_PROCESSES = "FLASHBAYES_NUM_PROCESSES"
ENV_PROCESS_ID = "FLASHBAYES_PROCESS_ID"
_SCHEDULER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class DistributedError(RuntimeError):
    """Processes could not be joined, or the devices asked for are not there."""


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands among the processes of one training run."""

    process_id: int
    num_processes: int
    coordinator: str | None

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise DistributedError(f"{name}: expected an integer; got {raw!r}") from exc


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> ProcessGroup:
    """Join the processes of a multi-host run (a no-op for a single process).

    Settings come from the arguments, else from ``FLASHBAYES_COORDINATOR``,
    ``FLASHBAYES_NUM_PROCESSES`` and ``FLASHBAYES_PROCESS_ID``, else, when a scheduler started
    several tasks (``SLURM_NTASKS``, ``OMPI_COMM_WORLD_SIZE`` or ``PMI_SIZE`` above 1), from the
    variables that scheduler sets, read by JAX's own cluster detection. Must run before anything
    touches a device.

    Args:
        coordinator: ``HOST:PORT`` of process 0's coordination service.
        num_processes: how many processes take part.
        process_id: this process's rank, ``0 <= process_id < num_processes``.

    Example:
        >>> initialize_distributed()  # one process: nothing to join
        ProcessGroup(process_id=0, num_processes=1, coordinator=None)
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given):
        if not all(given):
            raise DistributedError(
                "distributed: expected all of coordinator (HOST:PORT), num_processes and "
                f"process_id; got coordinator={coordinator!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}")
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedError(f"coordinator: expected HOST:PORT; got {coordinator!r}")
        if num_processes < 1:
            raise DistributedError(f"num_processes: expected >= 1; got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"process_id: expected 0..{num_processes - 1}; got "
                                   f"{process_id}")
        if num_processes == 1:
            return ProcessGroup(0, 1, None)
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return ProcessGroup(process_id, num_processes, coordinator)
    if any((_env_int(v) or 1) > 1 for v in _SCHEDULER_SIZE_VARS):
        jax.distributed.initialize()  # JAX reads the scheduler's variables
        return ProcessGroup(jax.process_index(), jax.process_count(), None)
    return ProcessGroup(0, 1, None)


def request_cpu_devices(n: int) -> None:
    """Ask for `n` CPU devices on this host (the CPU backend otherwise has one).

    Works only before JAX starts its backends; afterwards it checks that they are there.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"devices: expected a positive integer; got {n!r}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already started: fall through to the check in data_mesh
        pass


def data_mesh(devices: int | Sequence[Any] | None = None) -> Mesh:
    """A one-axis mesh named ``"data"``.

    Args:
        devices: None for every device of every process, N for the first N of them, or a list
            of devices.

    Example:
        >>> data_mesh(1).shape["data"]
        1
    """
    available = jax.devices()
    if devices is None:
        chosen = list(available)
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"devices: expected a positive integer; got {devices}")
        if devices > len(available):
            raise DistributedError(
                f"devices: expected at most the {len(available)} device(s) JAX sees "
                f"({available[0].platform}); got {devices}. On a CPU host, ask for more with "
                f"`flashbayes train --devices {devices}` or "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
        chosen = list(available[:devices])
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices: expected at least one device; got an empty list")
    if jax.process_count() > 1:
        missing = {d.process_index for d in available} - {d.process_index for d in chosen}
        if missing:
            raise DistributedError(f"devices: every process must own a device of the mesh; "
                                   f"processes {sorted(missing)} have none")
    return Mesh(np.array(chosen), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every array leaf of `tree` on every device of `mesh` (identical on all processes)."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, sharding) if isinstance(x, jax.Array | np.ndarray) else x,
        tree)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Inside a compiled step: split every leaf's leading (batch) axis over the mesh."""
    sharding = batch_sharded(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding) if getattr(x, "ndim", 0) else x,
        tree)


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of replicated arrays (readable on every process)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x) if isinstance(x, jax.Array) else x
    return jax.tree_util.tree_map(one, tree)


def broadcast_from_main(value: int) -> int:
    """Process 0's integer, on every process (the value itself with a single process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def barrier(name: str) -> None:
    """Wait until every process reaches the same named point (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
