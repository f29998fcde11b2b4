"""XLA options the program sets for its own jitted functions, so users never need `XLA_FLAGS`.

Passed per function (`jax.jit(..., compiler_options=compiler_options())`), so they touch nothing
else in the process. Only XLA:CPU gets any; GPU and TPU compile with XLA's defaults.

`xla_cpu_experimental_ynn_fusion_type` picks what XLA:CPU hands to the YNNPACK library:
- reductions (`LIBRARY_FUSION_TYPE_REDUCE`): the softmax's maxima and sums, LayerNorm's
  statistics, bias gradients. XLA:CPU's own rewrite long reductions into trees of
  `reduce-window`s that run as scalar loops; YNNPACK's are vectorised, and the Lite2 train step
  takes ~10 % less time on an Intel Xeon (docs/speed.md), with the golden losses and gradients
  unchanged (tests/test_speed.py).
- not jaxlib 0.10's default set, which also takes elementwise chains and runs them several times
  slower than XLA's own loops (that step 8-25 % slower), nor the float32 dots, which are no
  faster than the Eigen ones.
- with bfloat16 matmul operands, the dots as well (`library_dots`): XLA's own CPU dots compute
  bfloat16 in float32.
"""
from typing import Optional

import jax

_YNN = "xla_cpu_experimental_ynn_fusion_type"   # a comma-separated list
_CPU_OPTIONS = {_YNN: "LIBRARY_FUSION_TYPE_REDUCE"}


# YNNPACK's dots run bfloat16 operands on the CPU's bfloat16 units (AVX512-BF16, AMX).
_YNN_DOTS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def compiler_options(backend: Optional[str] = None, library_dots: bool = False) -> dict:
  """The options for `backend` (default: `jax.default_backend()`); {} off CPU.

  `library_dots`: the dots run in YNNPACK too; for bfloat16 matmul operands
  (`config.model.matmul_dtype`), which XLA:CPU would otherwise compute in float32.
  """
  if (backend or jax.default_backend()) != "cpu":
    return {}
  options = dict(_CPU_OPTIONS)
  if library_dots:
    options[_YNN] = ",".join([t for t in options[_YNN].split(",") if t] + [_YNN_DOTS])
  return options
