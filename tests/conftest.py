"""Test setup: 8 fake CPU devices (set before jax is imported), one XLA compilation cache for the
session, and the shared real data."""
import atexit
import json
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Many tests compile the same programs (the tiny train step, the evaluation maps), in this process
# and in the commands they start: one persistent cache, new for each session (so a test run never
# starts warm) and inherited by subprocesses through the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="onenip-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """`../shared/data` beside the repo root (real MVTec bottle, magnetic tile, DTD textures)."""
  if not (SHARED_DATA / "real").is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA}")
  return SHARED_DATA


def train_losses(workdir) -> dict:
  """step -> total loss, the last line of each step winning (a resumed run re-logs steps)."""
  path = os.path.join(workdir, "train_log.jsonl")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["total"] for r in rows if "total" in r}
