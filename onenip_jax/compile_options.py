"""XLA options the program sets for its own jitted functions, so users never need `XLA_FLAGS`.

Passed per function (`jax.jit(..., compiler_options=compiler_options())`), so they touch nothing
else in the process. Only XLA:CPU gets any; GPU and TPU compile with XLA's defaults.

`xla_cpu_experimental_ynn_fusion_type=""` turns off XLA:CPU's YNNPACK library fusions. In jaxlib
0.10 they take over reductions and elementwise chains (softmax max/sum, LayerNorm, the sum of the
position-embedding gradient over the batch) and run them several times slower than XLA's own
loops: the train step is 8-25 % faster without them (`launch/bench_train.py`), with identical
losses. Their matmuls are no faster than the Eigen ones in float32 (`launch/profile_step.py`).
"""
from typing import Optional

import jax

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(backend: Optional[str] = None) -> dict:
  """The options for `backend` (default: `jax.default_backend()`); {} off CPU."""
  return dict(_CPU_OPTIONS) if (backend or jax.default_backend()) == "cpu" else {}
