"""Mesh, shardings and per-process batches -> global `jax.Array`s.

One mesh axis, `data`: batches are split over it and the (small) trainable state is replicated.
The same code runs on 1 CPU, 8 fake CPU devices, a multi-GPU host and a TPU pod slice.
"""
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

log = logging.getLogger("onenip")


def maybe_initialize_distributed(requested: bool) -> None:
  """Calls `jax.distributed.initialize()` when the config or the launch environment asks for it.

  The environment asks when `JAX_COORDINATOR_ADDRESS` is set (our local launcher, which also sets
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`) or on a multi-host TPU slice (`TPU_WORKER_HOSTNAMES`
  lists several hosts). SLURM and TPU pods are auto-detected by `jax.distributed.initialize()`.
  Under SLURM each task is one process with one GPU (`slurm_local_device_ids`).
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
  elif (ids := slurm_local_device_ids(os.environ)) is not None:
    kwargs = dict(local_device_ids=ids)
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d: local devices %s", jax.process_index(), jax.process_count(),
           [str(d) for d in jax.local_devices()])


def _tasks_per_node(spec: str) -> list[int]:
  """SLURM's '8(x2),4' -> [8, 8, 4]."""
  out = []
  for part in filter(None, spec.split(",")):
    n, _, times = part.partition("(x")
    out += [int(n)] * int(times.rstrip(")") or 1)
  return out


def slurm_local_device_ids(environ) -> list[int] | None:
  """The GPU (CUDA ordinal) of this SLURM task: one process per GPU, JAX's convention.

  None outside a SLURM job step, or when the task sees no GPU list (`CUDA_VISIBLE_DEVICES` unset
  or empty, e.g. CPU): then `jax.distributed.initialize()` decides (GPU `SLURM_LOCALID`).
  A task that sees one GPU (`--gpus-per-task=1`) trains on it; tasks that share their node's GPUs
  (`--gpus-per-node=G --ntasks-per-node=G`, launch/slurm.sbatch) train on GPU `SLURM_LOCALID`
  each. Any other count fails: a process per node would otherwise train on one of its GPUs.
  """
  if "SLURM_STEP_NODELIST" not in environ or "SLURM_LOCALID" not in environ:
    return None
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and not {"cuda", "gpu"} & set(platforms.split(",")):
    return None
  gpus = [g for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
  if not gpus:
    return None
  if len(gpus) == 1:
    return [0]
  node = int(environ.get("SLURM_NODEID", 0))
  tasks = _tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                          or environ.get("SLURM_TASKS_PER_NODE", ""))
  here = tasks[node] if node < len(tasks) else None
  if here == len(gpus):
    return [int(environ["SLURM_LOCALID"])]
  raise ValueError(
      f"SLURM task {environ.get('SLURM_PROCID')} sees {len(gpus)} GPUs (CUDA_VISIBLE_DEVICES="
      f"{environ.get('CUDA_VISIBLE_DEVICES')}) on a node running {here} tasks of the step: "
      "training runs one process per GPU, so give each node as many tasks as GPUs "
      "(launch/slurm.sbatch: --ntasks-per-node equal to --gpus-per-node) or one GPU per task "
      "(--gpus-per-task=1)")


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
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
