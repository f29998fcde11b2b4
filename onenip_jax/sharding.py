"""Mesh, shardings and per-process batches -> global `jax.Array`s.

One mesh axis, `data`: batches are split over it and the (small) trainable state is replicated.
The same code runs on 1 CPU, 8 fake CPU devices, a multi-GPU host and a TPU pod slice.
"""
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(requested: bool) -> None:
  """Calls `jax.distributed.initialize()` when the config or the launch environment asks for it.

  The environment asks when `JAX_COORDINATOR_ADDRESS` is set (our local launcher, which also sets
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`) or on a multi-host TPU slice (`TPU_WORKER_HOSTNAMES`
  lists several hosts). SLURM and TPU pods are auto-detected by `jax.distributed.initialize()`.
  """
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  env = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or "," in tpu_hosts
  if not (requested or env):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if os.environ.get("JAX_NUM_PROCESSES"):  # set by launch/local_multiprocess.py
    kwargs = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def make_mesh() -> Mesh:
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, key: str = "batch_size") -> None:
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise ValueError(f"config.{key}={global_batch} must be divisible by the {n} devices and "
                     f"{jax.process_count()} processes")


def to_global(batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch {k: (b, ...)} -> global jax.Arrays {k: (b * process_count, ...)}.

  Each process passes only its own contiguous slice of the global batch (what the input pipeline
  yields); the result is sharded over the `data` axis.
  """
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) global array as a full numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
