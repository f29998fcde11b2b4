"""Train-step speed switches: the same loss and gradients as before them (golden file from the old
code, `tests/golden_train_step.py`), every attention implementation equal, bfloat16 matmuls that
really run on bfloat16 operands, 'auto' dtypes, and the profiler's HLO accounting."""
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from onenip_jax.compile_options import compiler_options
from onenip_jax.config import loading
from onenip_jax.config.base import get_base_config
from onenip_jax.models import mixed
from onenip_jax.models.onenip import OneNIP
from onenip_jax.models.transformer import MultiheadAttention, neighbor_mask

import golden_train_step as golden
from conftest import REPO


K_BIAS = "['k_proj']['bias']"


def _close(new: dict, old: dict) -> None:
  """Loss terms to 1e-5 relative; per gradient leaf each summary value to 1e-4 of sum |g|. The key
  bias gradients are zero but for round-off (softmax ignores a shift common to all keys): only
  their size is checked, against the key kernel's gradient."""
  for k, v in old["loss"].items():
    np.testing.assert_allclose(new["loss"][k], v, rtol=1e-5, err_msg=k)
  assert set(new["grads"]) == set(old["grads"])
  for leaf, ref in old["grads"].items():
    if leaf.endswith(K_BIAS):
      kernel = old["grads"][leaf.replace("['bias']", "['kernel']")][1]
      assert new["grads"][leaf][1] < 1e-6 * kernel and ref[1] < 1e-6 * kernel, leaf
      continue
    np.testing.assert_allclose(new["grads"][leaf], ref, rtol=0, atol=1e-4 * ref[1], err_msg=leaf)


@pytest.mark.parametrize("attention", ["head_major", "einsum", "fused"])
def test_train_step_loss_and_gradients_unchanged(attention):
  """float32: the objective and its gradients equal the old code's to round-off, whatever the
  attention implementation (with dropout active 'fused' runs the explicit path)."""
  with open(golden.GOLDEN, encoding="utf-8") as f:
    old = json.load(f)
  model = OneNIP(attention=attention, matmul_dtype="float32", **golden.TINY)
  _close(golden.summary(*golden.loss_and_grads(model)), old)


def test_train_step_compiler_options_keep_loss_and_gradients():
  """The XLA:CPU options of the train step (reductions in YNNPACK) change only float32 round-off:
  the golden loss terms and gradients hold when compiled with them."""
  with open(golden.GOLDEN, encoding="utf-8") as f:
    old = json.load(f)
  model = OneNIP(matmul_dtype="float32", **golden.TINY)
  options = compiler_options()
  assert options or jax.default_backend() != "cpu"
  _close(golden.summary(*golden.loss_and_grads(model, options)), old)


def test_reductions_run_in_the_library_on_cpu():
  """compiler_options(): the softmax's and LayerNorm's reductions compile to YNNPACK fusions, not
  XLA:CPU's tree of reduce-windows (scalar loops)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 196, 196)), jnp.float32)

  def f(x):
    centred = x - x.mean(-1, keepdims=True)
    return jax.nn.softmax(x, axis=-1) + centred * jax.lax.rsqrt((centred ** 2).mean(-1, keepdims=True))

  own = jax.jit(f, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
  assert "reduce-window" in own.lower(x).compile().as_text()   # XLA:CPU's own reductions
  for library_dots in (False, True):
    jitted = jax.jit(f, compiler_options=compiler_options("cpu", library_dots=library_dots))
    hlo = jitted.lower(x).compile().as_text()
    assert "reduce-window" not in hlo and "ynn_fusion" in hlo
    np.testing.assert_allclose(jitted(x), own(x), rtol=1e-5, atol=1e-6)


def _dots(jaxpr) -> list:
  """Every dot_general equation of a closed jaxpr, sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _dots(sub)
  return out


def test_bfloat16_matmuls_forward_and_backward():
  """matmul_dtype=bfloat16: every matmul of the objective and of its gradient takes bfloat16
  operands and accumulates in float32; loss and gradients stay close to float32's."""
  model = OneNIP(attention="head_major", matmul_dtype="bfloat16", **golden.TINY)
  q, p, m = golden.inputs()
  variables = model.init({"params": jax.random.key(0)}, q[:golden.B], p, train=False)

  def loss(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, q, p,
                         train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(1), "jitter": jax.random.key(2)})
    return out["recon"].sum() + out["ref_logit"].sum()

  dots = _dots(jax.make_jaxpr(jax.value_and_grad(loss))(variables["params"]).jaxpr)
  # The align-corners resizes are float32 matmuls with interpolation matrices at HIGHEST precision.
  dots = [e for e in dots if e.params["precision"] is None]
  # forward: 4 attentions x (4 projections + 2 attention matmuls), 2 FFNs x 2, input and output
  # projections, 2 deconvolutions; backward twice that.
  assert len(dots) >= 3 * (4 * 6 + 2 * 2 + 2 + 2)
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
    assert eqn.outvars[0].aval.dtype == jnp.float32, eqn

  parts, grads = golden.loss_and_grads(model)
  parts32, grads32 = golden.loss_and_grads(model.clone(matmul_dtype="float32"))
  for k, v in parts32.items():
    np.testing.assert_allclose(parts[k], v, rtol=2e-2, err_msg=k)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  g, g32 = flat(grads), flat(grads32)
  assert g @ g32 / np.linalg.norm(g) / np.linalg.norm(g32) > 0.999
  np.testing.assert_allclose(np.linalg.norm(g), np.linalg.norm(g32), rtol=1e-2)


def _attention_inputs(n=16, b=3, d=32, seed=0):
  x = jax.random.normal(jax.random.key(seed), (3, b, n, d))
  return x[0], x[1], x[2]


@pytest.mark.parametrize("mask_kind", ["none", "neighbour", "random"])
def test_attention_implementations_equal(mask_kind):
  """'fused' (jax.nn.dot_product_attention), 'head_major' and 'einsum': same parameters, outputs
  and gradients to 1e-5, with and without masks (True = may attend in all three)."""
  q, k, v = _attention_inputs()
  mask = {"none": None, "neighbour": jnp.asarray(neighbor_mask(4, 4, (2, 2))),
          "random": jnp.asarray(np.random.default_rng(0).random((16, 16)) > 0.5)
          | jnp.eye(16, dtype=bool)}[mask_kind]
  variables = MultiheadAttention(32, 4, implementation="einsum").init(jax.random.key(1), q, k, v)
  results = {}
  for impl in ("einsum", "head_major", "fused"):
    mha = MultiheadAttention(32, 4, dropout=0.1, implementation=impl)
    init = mha.init(jax.random.key(1), q, k, v, mask)
    jax.tree.map(np.testing.assert_array_equal, init, variables)
    f = lambda variables, q: mha.apply(variables, q, k, v, mask, deterministic=True)
    results[impl] = (f(variables, q), jax.grad(lambda var, q: f(var, q).sum(), (0, 1))(variables, q))
  for impl in ("head_major", "fused"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 results[impl], results["einsum"])
  if mask is not None:   # the mask matters: unmasked attention differs
    free = MultiheadAttention(32, 4, implementation="fused").apply(variables, q, k, v)
    assert np.abs(np.asarray(free - results["fused"][0])).max() > 1e-3


def test_fused_attention_keeps_dropout_in_training():
  """With attention dropout active 'fused' runs the explicit path: the same dropped probabilities
  as 'head_major' for the same key."""
  q, k, v = _attention_inputs()
  mask = jnp.asarray(neighbor_mask(4, 4, (2, 2)))
  outs = []
  for impl in ("head_major", "fused"):
    mha = MultiheadAttention(32, 4, dropout=0.5, implementation=impl)
    variables = mha.init(jax.random.key(1), q, k, v, mask)
    outs.append(mha.apply(variables, q, k, v, mask, deterministic=False,
                          rngs={"dropout": jax.random.key(3)}))
  np.testing.assert_array_equal(outs[0], outs[1])
  deterministic = mha.apply(variables, q, k, v, mask)
  assert np.abs(np.asarray(outs[1] - deterministic)).max() > 1e-3


def test_auto_dtype(monkeypatch):
  assert mixed.resolve_dtype("auto") == jnp.float32     # the tests run on CPU
  assert mixed.resolve_dtype("bfloat16") == jnp.bfloat16
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert mixed.resolve_dtype("auto") == jnp.bfloat16
  cfg = get_base_config().model
  model = OneNIP.from_config(cfg)
  assert (model.dtype, model.matmul_dtype) == (jnp.bfloat16, jnp.bfloat16)
  cfg.matmul_dtype = cfg.dtype = "float32"
  assert OneNIP.from_config(cfg).matmul_dtype == jnp.float32


def test_mixed_einsum_gradients():
  """mixed.einsum in bfloat16: float32 results equal to the float32 einsum of the rounded operands,
  gradients equal to the float32 ones of the rounded operands and cotangent."""
  a = jax.random.normal(jax.random.key(0), (2, 5, 7))
  b = jax.random.normal(jax.random.key(1), (7, 3))
  ct = jax.random.normal(jax.random.key(2), (2, 5, 3))
  r = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
  y, vjp = jax.vjp(lambda a, b: mixed.einsum("bik,kj->bij", a, b, jnp.bfloat16), a, b)
  y0, vjp0 = jax.vjp(lambda a, b: jnp.einsum("bik,kj->bij", a, b), r(a), r(b))
  np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
  for g, g0 in zip(vjp(ct), vjp0(r(ct))):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, g0, rtol=1e-6, atol=1e-6)
  assert mixed.dot_general("float32") is None


def test_profile_step_hlo_accounting():
  """launch/profile_step.py: each compiled instruction gets its kind, dots their 2 M N K x batch."""
  prof = loading.load_python_file(str(REPO / "launch" / "profile_step.py"))

  def f(x, w, a, b, img, kernel):
    y = jnp.tanh(x @ w + 1.0)
    att = jnp.einsum("bhqd,bhkd->bhqk", a, b)
    conv = jax.lax.conv_general_dilated(img, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.sum(axis=1), att, conv, x.T.copy()

  args = (jnp.ones((64, 48)), jnp.ones((48, 40)), jnp.ones((2, 3, 10, 8)), jnp.ones((2, 3, 12, 8)),
          jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 5)))
  hlo = jax.jit(f, compiler_options=compiler_options()).lower(*args).compile().as_text()
  instrs, comps = prof.parse_hlo(hlo)
  executed = [n for n in comps[next(c for c in comps if "main" in c)]
              if instrs[n]["opcode"] not in ("parameter", "constant", "tuple", "bitcast")]
  flops, kinds = {}, set()
  for n in executed:
    kind, dot = prof.kind_of(n, instrs, comps)
    kinds.add(kind)
    if dot is not None:
      flops[dot] = prof.dot_cost(dot, instrs)[0]
  assert sorted(flops.values()) == sorted([2 * 64 * 40 * 48, 2 * 6 * 10 * 12 * 8,
                                           2 * (2 * 6 * 6 * 5) * (3 * 3 * 4)])
  assert {"dot / convolution", "reduce"} <= kinds
  assert prof.part_of("jit(train_step)/transpose(jvp(OneNIP))/encoder_layer0/x") == ("encoder", "backward")


def test_bfloat16_dots_run_in_the_library_on_cpu():
  """compiler_options(library_dots=True): the forward and input-gradient bfloat16 dots of a
  Dense-form mixed.einsum compile to YNNPACK fusions on bfloat16 operands (XLA's own CPU dots
  convert them to float32; the weight gradient, contracted over the rows, still is), with the
  same results as XLA's dots."""
  a = jax.random.normal(jax.random.key(0), (64, 48))
  b = jax.random.normal(jax.random.key(1), (48, 40))
  f = jax.value_and_grad(lambda a, b: jnp.tanh(mixed.einsum("nk,km->nm", a, b, jnp.bfloat16)).sum(),
                         (0, 1))
  prof = loading.load_python_file(str(REPO / "launch" / "profile_step.py"))
  for library_dots, expected in ((True, 2), (False, 0)):
    jitted = jax.jit(f, compiler_options=compiler_options("cpu", library_dots=library_dots))
    instrs, _ = prof.parse_hlo(jitted.lower(a, b).compile().as_text())
    bf16_library = [i for i in instrs.values() if i["opcode"] == "fusion" and "ynn" in i["attrs"]
                    and all(instrs[o]["shape"].startswith("bf16") for o in i["operands"])]
    assert len(bf16_library) == expected
  library = jax.jit(f, compiler_options=compiler_options("cpu", library_dots=True))
  # float32 accumulation in another order; the bfloat16 cotangent may round the other way
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3),
               library(a, b), jitted(a, b))


def test_bfloat16_attention_gradients_run_in_the_library_on_cpu():
  """The attention's backward products in bfloat16 (they contract the query axis of both operands)
  run in YNNPACK on CPU: the compiled gradient executes, every bfloat16 dot is a library fusion,
  and it equals the gradient of XLA's own dots (bfloat16 operands computed in float32)."""
  q = jax.random.normal(jax.random.key(0), (3, 16, 32))
  mha = MultiheadAttention(32, 4, dropout=0.1, matmul_dtype=jnp.bfloat16)
  variables = mha.init(jax.random.key(1), q, q, q)
  grad = jax.grad(lambda var, q: mha.apply(var, q, q, q, deterministic=False,
                                           rngs={"dropout": jax.random.key(2)}).sum(), (0, 1))
  prof = loading.load_python_file(str(REPO / "launch" / "profile_step.py"))
  library = jax.jit(grad, compiler_options=compiler_options("cpu", library_dots=True))
  instrs, comps = prof.parse_hlo(library.lower(variables, q).compile().as_text())
  in_library = {n for i in instrs.values() if i["opcode"] == "fusion" and "ynn" in i["attrs"]
                for n in prof._called(i, comps, instrs)}
  bf16_dots = [n for n, i in instrs.items() if i["opcode"] == "dot"
               and instrs[i["operands"][0]]["shape"].startswith("bf16")]
  assert bf16_dots and set(bf16_dots) <= in_library
  xla = jax.jit(grad, compiler_options=compiler_options("cpu", library_dots=False))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-2, atol=2e-3),
               library(variables, q), xla(variables, q))


def test_bench_train_xla_options():
  """`bench_train --xla`: typed XLA:CPU options; anything not named xla_... is refused."""
  bench = loading.load_python_file(str(REPO / "launch" / "bench_train.py"))
  assert bench.parse_xla_options("xla_cpu_enable_fast_min_max=true,xla_cpu_a=3,"
                                 "xla_cpu_experimental_ynn_fusion_type=") == {
      "xla_cpu_enable_fast_min_max": True, "xla_cpu_a": 3, "xla_cpu_experimental_ynn_fusion_type": ""}
  assert bench.parse_xla_options("xla_cpu_experimental_ynn_fusion_type=A+B") == {
      "xla_cpu_experimental_ynn_fusion_type": "A,B"}
  with pytest.raises(ValueError, match="fast_min_max"):
    bench.parse_xla_options("fast_min_max=true")
