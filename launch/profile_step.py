r"""Where the train step's time goes: one `jax.profiler` trace, attributed to the model's parts.

  python -m launch.profile_step [--backbone lite2] [--batch 8] [--res 224] [--cache] [--trace DIR]

Builds the step of `launch/bench_train.py`, runs it twice (compile, warm-up), traces a third run
and attributes the wall time of every XLA operation to a part of the step through the op's
`op_name` metadata (Flax module paths and the `named_scope`s of `train.py`): backbone (+ neck),
encoder, decoder, final attention, refiner, dropout (mask + apply), jitter, losses, optimiser
update, the rest. `jvp(...)` marks the forward pass of the differentiated network, `transpose(...)`
its backward pass. Operations that overlap in time (XLA:CPU runs independent ones on several
threads; matmuls run asynchronously) share the overlap equally, so the parts add up to the step.
Prints a markdown table (ms and %).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from onenip_jax import config_loading

# The sibling script, by path: launch/ is not an installed package (run by path or with -m).
bench_train = config_loading.load_python_file(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_train.py"))


# (substring of op_name, part), first match wins.
_PARTS = (
    ("threefry", "random numbers"), ("_bernoulli", "random numbers"),
    ("random_bits", "random numbers"), ("/jitter/", "jitter"), ("Dropout", "dropout (mask + apply)"),
    ("EfficientNet", "backbone + neck"), ("/neck/", "backbone + neck"),
    ("encoder_layer", "encoder"), ("decoder_layer", "decoder"), ("final_attn", "final attention"),
    ("refiner", "refiner"),
    ("input_proj", "projections, position embedding"),
    ("output_proj", "projections, position embedding"),
    ("decoder_norm", "projections, position embedding"),
    ("pos_embed", "projections, position embedding"),
    ("(loss)", "losses"), ("/loss/", "losses"), ("/optimizer/", "optimiser update"),
)


def part_of(op_name: str) -> tuple:
  """(part, pass) of one XLA op; pass is 'forward', 'backward' or '' (outside the gradient)."""
  phase = "backward" if "transpose(" in op_name else ("forward" if "jvp(" in op_name else "")
  for key, part in _PARTS:
    if key in op_name:
      return part, phase
  return "other (OneNIP glue)" if "OneNIP" in op_name else "other", phase


def op_names(hlo_text: str) -> dict:
  """{instruction name: op_name metadata} of a compiled HLO module."""
  pattern = r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\""
  return {m.group(1): m.group(2) for m in re.finditer(pattern, hlo_text, re.M)}


def attribute(trace_file: str, names: dict) -> tuple:
  """Wall time (us) per (part, pass) of the one execution recorded in `trace_file`.

  An op runs from its event's start to its 'end: NAME' marker (matmul thunks return before their
  work is done); where k ops overlap, each gets 1/k of that time.
  """
  with gzip.open(trace_file) as f:
    events = sorted((e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"),
                    key=lambda e: e["ts"])
  runs = [e for e in events if e["name"].startswith("ThunkExecutor::Execute (wait")]
  if not runs:
    raise RuntimeError(f"{trace_file}: no XLA:CPU execution found (this script reads CPU traces)")
  run = max(runs, key=lambda e: e["dur"])
  t0, t1 = run["ts"], run["ts"] + run["dur"]
  start, spans = {}, []
  for e in events:
    name = e["name"]
    if name.startswith("end: ") and name[5:] in start:
      s = start.pop(name[5:])
      spans.append((s, max(e["ts"], s), name[5:]))
    elif name in names and t0 <= e["ts"] <= t1:
      start[name] = e["ts"]
  spans += [(s, s + 0.0, n) for n, s in start.items()]
  edges = sorted([(a, 1, n) for a, b, n in spans if b > a] + [(b, -1, n) for a, b, n in spans if b > a])
  total, active, last = collections.Counter(), collections.Counter(), None
  for t, delta, name in edges:
    if last is not None and active:
      share = (t - last) / sum(active.values())
      for n, c in active.items():
        total[part_of(names[n])] += share * c
    active[name] += delta
    if not active[name]:
      del active[name]
    last = t
  return total, t1 - t0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backbone", default="lite2")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--cache", action="store_true", help="feature cache on")
  p.add_argument("--trace", default="", help="keep the trace here (default: a temporary folder)")
  a = p.parse_args()
  if jax.default_backend() != "cpu":
    raise SystemExit("profile_step reads XLA:CPU traces; on GPU/TPU open the trace in XProf")
  step, args = bench_train.build(a.backbone, a.dtype, a.cache, a.batch, a.res)
  names = op_names(step.lower(*args).compile().as_text())
  for _ in range(2):
    state, m = step(*args)
    jax.block_until_ready(m)
    args = (state,) + args[1:]
  trace_dir = a.trace or tempfile.mkdtemp(prefix="onenip-trace-")
  jax.profiler.start_trace(trace_dir)
  state, m = step(*args)
  jax.block_until_ready(m)
  jax.profiler.stop_trace()
  trace_file = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
  total, wall = attribute(trace_file, names)
  attributed = sum(total.values())
  print(f"# one train step, {a.backbone} {a.dtype}, batch {a.batch} at {a.res}px, feature cache "
        f"{'on' if a.cache else 'off'}: {wall / 1e3:.0f} ms traced ({attributed / 1e3:.0f} ms in XLA ops); "
        f"trace in {trace_dir}")
  print("| part | pass | ms | % |")
  print("|---|---|---|---|")
  for (part, phase), us in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"| {part} | {phase or '-'} | {us / 1e3:.0f} | {100 * us / attributed:.1f} |")


if __name__ == "__main__":
  main()
