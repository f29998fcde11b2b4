"""The accelerator benchmark runs end to end on CPU at a tiny size, so it cannot rot."""
import math

from launch import bench_accelerator


def test_bench_accelerator_prints_a_full_row(capsys):
  bench_accelerator.main(["--backbone", "lite0", "--batch", "8", "--res", "64", "--steps", "1",
                          "--dtypes", "float32", "--cache", "on"])
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if l.startswith("| float32 |")]
  assert len(rows) == 1, out
  cells = [c.strip() for c in rows[0].strip("|").split("|")]
  dtype, cache, compile_s, s_step, steps_s, images_s, mem, gflop, mfu, sched_h = cells
  assert (dtype, cache) == ("float32", "on")
  assert float(compile_s) > 0 and float(s_step) > 0
  assert math.isclose(float(steps_s), 1 / float(s_step), rel_tol=0.02)
  assert math.isclose(float(images_s), 8 / float(s_step), rel_tol=0.02)
  assert float(gflop) > 1.0            # transformer + refiner at 4x4 tokens, 8 + 8 images
  assert mfu == "-" and mem == "-"     # CPU: no peak in the table, no device memory statistics
  expected_h = 1000 * math.ceil(3629 / 8) * float(s_step) / 3600
  assert math.isclose(float(sched_h), expected_h, rel_tol=0.02)


def test_peak_table_knows_the_accelerators_of_the_issue():
  for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "TPU v4", "TPU v5 lite",
               "TPU v5p"):
    assert bench_accelerator.peak_tflops(kind, "bfloat16") > 100, kind
  assert bench_accelerator.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 156.0
  assert bench_accelerator.peak_tflops("cpu", "float32") is None
