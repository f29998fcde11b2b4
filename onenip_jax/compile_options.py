"""XLA options the program sets for its own jitted functions, so users never need `XLA_FLAGS`.

Passed per function (`jax.jit(..., compiler_options=compiler_options())`), so they touch nothing
else in the process. Only XLA:CPU gets any; GPU and TPU compile with XLA's defaults.

`xla_cpu_experimental_ynn_fusion_type=""` turns off XLA:CPU's YNNPACK library fusions. In jaxlib
0.10 they take over reductions and elementwise chains (softmax max/sum, LayerNorm, the sum of the
position-embedding gradient over the batch) and run them several times slower than XLA's own
loops: the train step is 8-25 % faster without them (`launch/bench_train.py`), with identical
losses. Their matmuls are no faster than the Eigen ones in float32 (`launch/profile_step.py`).
With bfloat16 matmul operands the dots alone go to YNNPACK (`library_dots`): XLA's own CPU dots
compute bfloat16 in float32.
"""
from typing import Optional

import jax

_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


# YNNPACK for the dots alone: XLA:CPU's own dots upcast bfloat16 operands to float32 (a float32
# matmul plus converts), YNNPACK's run them on the CPU's bfloat16 units (AVX512-BF16, AMX).
_YNN_DOTS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def compiler_options(backend: Optional[str] = None, library_dots: bool = False) -> dict:
  """The options for `backend` (default: `jax.default_backend()`); {} off CPU.

  `library_dots`: the dots (only them) run in YNNPACK; for bfloat16 matmul operands
  (`config.model.matmul_dtype`), which XLA:CPU would otherwise compute in float32.
  """
  if (backend or jax.default_backend()) != "cpu":
    return {}
  options = dict(_CPU_OPTIONS)
  if library_dots:
    options["xla_cpu_experimental_ynn_fusion_type"] = _YNN_DOTS
  return options
