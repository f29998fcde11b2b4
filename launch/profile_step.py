r"""Where the train step's time goes: one `jax.profiler` trace, attributed to the model's parts.

  python -m launch.profile_step [--backbone lite2] [--batch 8] [--res 224] [--cache] [--trace DIR]

Builds the step of `launch/bench_train.py`, runs it twice (compile, warm-up), traces a third run and
attributes the wall time of every XLA operation to a part of the step through the op's `op_name`
metadata (Flax module paths and the `named_scope`s of `training/step.py`): backbone (+ neck),
encoder, decoder, final attention, refiner, dropout (mask + apply), jitter, losses, optimiser
update, the rest. `jvp(...)` marks the forward pass of the differentiated network, `transpose(...)`
its backward pass. Operations that overlap in time (XLA:CPU runs independent ones on several
threads; matmuls run asynchronously) share the overlap equally, so the parts add up to the step.
Prints a markdown table (ms and %).

Then the same time by XLA operation kind (dot/convolution, reduce, elementwise fusion,
copy/transpose, other: from each op's HLO instruction and, for a fusion, what it fuses), the ten
costliest dots with their shapes, FLOPs and achieved GFLOP/s (2 M N K x batch / time), and this
machine's own 2048^3 matmul speed (float32, and bfloat16 operands with float32 accumulation)
measured in the same run, so that the dots' share of it and the time outside the dots are
printed directly. The header names the CPU and its vector/matrix flags (`lscpu`).
With `--model KEY=VALUE,...` (config.model overrides, e.g. `attention=einsum` or
`matmul_dtype=bfloat16`) the same step is profiled in another configuration.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from onenip_jax.compile_options import compiler_options
from onenip_jax.config import loading

# The sibling script, by path: launch/ is not an installed package (run by path or with -m).
bench_train = loading.load_python_file(
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


def op_times(trace_file: str, names) -> tuple:
  """({op: wall time (us)}, {op: executions}, step wall time (us)) of the one execution recorded
  in `trace_file`; `names` holds the HLO instruction names to look for.

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
  count = collections.Counter(n for _, _, n in spans)
  edges = sorted([(a, 1, n) for a, b, n in spans if b > a] + [(b, -1, n) for a, b, n in spans if b > a])
  total, active, last = collections.Counter(), collections.Counter(), None
  for t, delta, name in edges:
    if last is not None and active:
      share = (t - last) / sum(active.values())
      for n, c in active.items():
        total[n] += share * c
    active[name] += delta
    if not active[name]:
      del active[name]
    last = t
  return total, count, t1 - t0


def attribute(trace_file: str, names: dict) -> tuple:
  """Wall time (us) per (part, pass) of the one execution recorded in `trace_file`, and the step's
  wall time (us)."""
  per_op, _, wall = op_times(trace_file, names)
  total = collections.Counter()
  for n, us in per_op.items():
    total[part_of(names[n])] += us
  return total, wall


# HLO instructions of a compiled module: `%name = SHAPE opcode(operands), attributes`.
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*?)\)(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def parse_hlo(hlo_text: str) -> tuple:
  """({instruction: dict(opcode, shape, operands, attrs, computation)}, {computation: [its
  instructions]}) of a compiled HLO module's text."""
  instrs, comps, comp = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if m:
      name, shape, opcode, operands, attrs = m.groups()
      instrs[name] = dict(opcode=opcode, shape=shape, attrs=attrs, computation=comp,
                          operands=re.findall(r"%([\w.\-]+)", operands))
      comps[comp].append(name)
  return instrs, comps


def _dims(shape: str) -> list:
  m = _SHAPE.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _called(instr: dict, comps: dict, instrs: dict) -> list:
  """Every instruction of the computations `instr` calls (fusions, nested), recursively."""
  out = []
  for c in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", instr["attrs"]):
    for n in comps.get(c, ()):
      out.append(n)
      out += _called(instrs[n], comps, instrs)
  return out


_DOTS = ("dot", "convolution")
_REDUCES = ("reduce", "reduce-window", "select-and-scatter")
_MOVES = ("copy", "transpose", "bitcast", "reshape", "parameter", "broadcast", "constant", "slice")


def kind_of(name: str, instrs: dict, comps: dict) -> tuple:
  """(kind, the dot or convolution instruction or None) of one executed instruction."""
  ins = instrs[name]
  inner = [name] + _called(ins, comps, instrs)
  ops = [instrs[n]["opcode"] for n in inner]
  for n in inner:
    if instrs[n]["opcode"] in _DOTS:
      return "dot / convolution", n
  if ins["opcode"] == "custom-call" and re.search(r"matmul|conv", ins["attrs"], re.I):
    return "dot / convolution", None
  if any(o in _REDUCES for o in ops):
    return "reduce", None
  if ins["opcode"] in ("copy", "transpose") or (
      ins["opcode"] == "fusion" and all(o in _MOVES or o == "fusion" for o in ops)
      and any(o in ("copy", "transpose") for o in ops)):
    return "copy / transpose", None
  if ins["opcode"] == "fusion":
    return "elementwise fusion", None
  return "other", None


def dot_cost(name: str, instrs: dict) -> tuple:
  """(FLOPs, 'shapes' text) of one dot or convolution instruction: 2 M N K x batch."""
  ins = instrs[name]
  out = _dims(ins["shape"])
  shapes = [instrs[o]["shape"] for o in ins["operands"][:2] if o in instrs]
  lhs, rhs = (_dims(s) for s in shapes) if len(shapes) == 2 else ([], [])
  n_out = int(np.prod(out)) if out else 0
  attrs = ins["attrs"]
  if ins["opcode"] == "dot":
    def get(key):
      m = re.search(key + r"=\{([\d,]*)\}", attrs)
      return [int(d) for d in m.group(1).split(",") if d] if m else []

    k = int(np.prod([lhs[d] for d in get("lhs_contracting_dims")])) if lhs else 0
    nb = int(np.prod([lhs[d] for d in get("lhs_batch_dims")])) if lhs else 1
    m = int(np.prod(lhs)) // max(k * nb, 1) if lhs else 0
    n = int(np.prod(rhs)) // max(k * nb, 1) if rhs else 0
    desc = f"batch {nb}, M {m}, N {n}, K {k}"
  else:
    labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
    o = rhs[labels.group(1).index("o")] if labels and rhs else 1
    k = int(np.prod(rhs)) // max(o, 1) if rhs else 0
    window = re.search(r"window=\{size=([\dx]+)", attrs)
    desc = f"conv {window.group(1) if window else ''}, K {k}"
  short = lambda s: _SHAPE.search(s).group(0) if _SHAPE.search(s) else s
  text = f"{' x '.join(short(s) for s in shapes)} -> {short(ins['shape'])} ({desc})"
  return 2 * n_out * k, text


def matmul_speed(dtype, n: int = 2048, reps: int = 5) -> float:
  """GFLOP/s of an n^3 matmul on this machine: `dtype` operands, float32 accumulation and result,
  compiled as the train step compiles it (bfloat16: YNNPACK dots, `compiler_options`)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(n, n)), dtype)
  b = jnp.asarray(rng.normal(size=(n, n)), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32),
              compiler_options=compiler_options(library_dots=dtype == jnp.bfloat16))
  jax.block_until_ready(f(a, b))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(f(a, b))
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times) / 1e9


def cpu_header() -> str:
  """'model name; flags: ...' of `lscpu` (the vector and matrix flags that decide matmul speed)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "lscpu unavailable"
  info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
  model = info.get("Model name", "?").strip()
  flags = set(info.get("Flags", "").split())
  wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
  return model + "; " + ", ".join(f"{w}: {'yes' if w in flags else 'no'}" for w in wanted)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backbone", default="lite2")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--res", type=int, default=224)
  p.add_argument("--cache", action="store_true", help="feature cache on")
  p.add_argument("--model", default="", help="config.model overrides KEY=VALUE,... (bench_train)")
  p.add_argument("--trace", default="", help="keep the trace here (default: a temporary folder)")
  p.add_argument("--top", type=int, default=10, help="dots listed")
  p.add_argument("--ops", type=int, default=0, help="also list the N costliest operations that are not dots")
  p.add_argument("--hlo", default="", help="write the compiled step's HLO text to this file")
  a = p.parse_args()
  if jax.default_backend() != "cpu":
    raise SystemExit("profile_step reads XLA:CPU traces; on GPU/TPU open the trace in XProf")
  overrides = bench_train.parse_overrides(a.model)
  step, args = bench_train.build(a.backbone, a.dtype, a.cache, a.batch, a.res, overrides)
  hlo = step.lower(*args).compile().as_text()
  names, (instrs, comps) = op_names(hlo), parse_hlo(hlo)
  if a.hlo:
    with open(a.hlo, "w") as f:
      f.write(hlo)
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
  per_op, count, wall = op_times(trace_file, set(instrs) | set(names))
  del state, m, args
  peak = {"float32": matmul_speed(jnp.float32), "bfloat16": matmul_speed(jnp.bfloat16)}

  total = collections.Counter()
  kinds, dots, others = collections.Counter(), [], []
  for n, us in per_op.items():
    total[part_of(names.get(n, ""))] += us
    kind, dot = kind_of(n, instrs, comps) if n in instrs else ("other", None)
    kinds[kind] += us
    if dot is None:
      others.append((us, n, kind, names.get(n, "")))
    else:
      flops, shapes = dot_cost(dot, instrs)
      dots.append((us, flops * count[n], n, shapes, names.get(n, "")))
  attributed = sum(total.values())
  conf = ", ".join(f"{k}={v}" for k, v in overrides.items())
  print(f"# one train step, {a.backbone} {a.dtype}{' (' + conf + ')' if conf else ''}, batch "
        f"{a.batch} at {a.res}px, feature cache {'on' if a.cache else 'off'}: {wall / 1e3:.0f} ms "
        f"traced ({attributed / 1e3:.0f} ms in XLA ops); trace in {trace_dir}")
  print(f"# CPU: {cpu_header()}; {os.cpu_count()} cores; jax {jax.__version__}")
  print(f"# this machine's 2048^3 matmul: float32 {peak['float32']:.0f} GFLOP/s, bfloat16 operands "
        f"(float32 accumulation, YNNPACK) {peak['bfloat16']:.0f} GFLOP/s")
  print()
  print("| part | pass | ms | % |")
  print("|---|---|---|---|")
  for (part, phase), us in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"| {part} | {phase or '-'} | {us / 1e3:.0f} | {100 * us / attributed:.1f} |")
  print()
  print("| operation kind | ms | % |")
  print("|---|---|---|")
  for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
    print(f"| {kind} | {us / 1e3:.0f} | {100 * us / attributed:.1f} |")
  dot_us = sum(d[0] for d in dots)
  dot_flops = sum(d[1] for d in dots)
  print()
  print(f"| dot (the {a.top} costliest) | part | shapes | ms | GFLOP | GFLOP/s | % of step |")
  print("|---|---|---|---|---|---|---|")
  for us, flops, n, shapes, op in sorted(dots, key=lambda d: -d[0])[:a.top]:
    part, phase = part_of(op)
    print(f"| {n} | {part}{' ' + phase if phase else ''} | {shapes} | {us / 1e3:.1f} | "
          f"{flops / 1e9:.2f} | {flops / max(us, 1e-9) / 1e3:.0f} | {100 * us / attributed:.1f} |")
  print()
  if a.ops:
    print(f"| not a dot (the {a.ops} costliest) | kind | part | calls | ms | % of step |")
    print("|---|---|---|---|---|---|")
    for us, n, kind, op in sorted(others, key=lambda o: -o[0])[:a.ops]:
      part, phase = part_of(op)
      print(f"| {n} | {kind} | {part}{' ' + phase if phase else ''} | {count[n]} | {us / 1e3:.1f} | "
            f"{100 * us / attributed:.1f} |")
    print()
  if dot_us:
    achieved = dot_flops / dot_us / 1e3
    ref = "bfloat16" if overrides.get("matmul_dtype") == "bfloat16" or a.dtype == "bfloat16" else "float32"
    print(f"dots and convolutions: {dot_flops / 1e9:.1f} GFLOP in {dot_us / 1e6:.3f} s = "
          f"{achieved:.0f} GFLOP/s, {100 * achieved / peak[ref]:.0f} % of this machine's {ref} "
          f"matmul speed ({peak[ref]:.0f} GFLOP/s); at that speed they would take "
          f"{dot_flops / peak[ref] / 1e9:.3f} s")
  print(f"non-dot time: {(attributed - dot_us) / 1e6:.3f} s of {attributed / 1e6:.3f} s in XLA ops "
        f"({100 * (attributed - dot_us) / max(attributed, 1e-9):.0f} %)")


if __name__ == "__main__":
  main()
