"""OneNIP network: attention parity with PyTorch, neighbour mask, parameter count, init, shapes,
decoder variants, Dice gradients and grouped BatchNorm. Small models where the depth does not
matter, to keep the CPU compile time low."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from onenip_jax.config.base import get_base_config
from onenip_jax.models.features import neck
from onenip_jax.models.onenip import OneNIP
from onenip_jax.models.resize import resize_align_corners
from onenip_jax.models.transformer import MultiheadAttention, neighbor_mask
from onenip_jax.training.losses import dice_loss

C = 272
SMALL = dict(enc_layers=1, dec_layers=1)   # one layer of each kind: same code paths, faster compile


def _rngs(seed=0):
  """RNG streams; dropout/jitter use 'unsafe_rbg' keys: on CPU, threefry-based dropout masks make
  XLA compile several times slower, and the model does not depend on the key implementation."""
  k = jax.random.split(jax.random.key(seed, impl="unsafe_rbg"), 2)
  return {"params": jax.random.key(seed), "dropout": k[0], "jitter": k[1]}


def _feats(seed, b, h):
  """Random (b, h, h, C) float32 features (numpy: no per-shape compile)."""
  return np.random.default_rng(seed).normal(size=(b, h, h, C)).astype(np.float32)


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_variables(model, h, seed=0):
  """Random variables with the model's structure for an h x h grid, filled with numpy (no init
  compile): kernels N(0, 1/fan_in), biases 0, norms identity, embeddings U[0, 1)."""
  shapes = jax.eval_shape(lambda: model.init(_rngs(), jnp.zeros((1, h, h, C)),
                                             jnp.zeros((1, h, h, C)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['bias']") or name.endswith("['mean']"):
      return np.zeros(s.shape, np.float32)
    if name.endswith("['scale']") or name.endswith("['var']"):
      return np.ones(s.shape, np.float32)
    if "embed" in name:
      return rng.uniform(size=s.shape).astype(np.float32)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _apply_fn(model, train):
  """jit(apply): (variables, query, prompt, seed) -> outputs (train: (outputs, new batch_stats))."""

  def f(variables, query, prompt, seed):
    if train:
      out, state = model.apply(variables, query, prompt, train=True, rngs=_rngs(seed),
                               mutable=["batch_stats"])
      return out, state.get("batch_stats")
    return model.apply(variables, query, prompt, train=False)

  return jax.jit(f)


def _train(model, variables, q, p, seed=0):
  return _np(_apply_fn(model, True)(variables, q, p, seed))


def _eval(model, variables, q, p):
  return _np(_apply_fn(model, False)(variables, q, p, 0))


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("torch_mask", [None, "float", "bool"])
def test_attention_matches_torch(torch_mask):
  """torch: additive -inf float mask or bool mask (True = blocked); ours: bool, True = attend."""
  torch = pytest.importorskip("torch")
  masked = torch_mask is not None
  d, heads, b, h = 256, 8, 2, 14
  n = h * h
  rng = np.random.default_rng(0)
  q_in = rng.normal(size=(b, n, d)).astype(np.float32)
  kv_in = rng.normal(size=(b, n, d)).astype(np.float32)
  v_in = rng.normal(size=(b, n, d)).astype(np.float32)
  w_in = rng.uniform(-0.2, 0.2, size=(3 * d, d)).astype(np.float32)
  b_in = rng.normal(scale=0.1, size=(3 * d,)).astype(np.float32)
  w_out = rng.uniform(-0.1, 0.1, size=(d, d)).astype(np.float32)
  b_out = rng.normal(scale=0.1, size=(d,)).astype(np.float32)

  tm = torch.nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=True)
  with torch.no_grad():
    tm.in_proj_weight.copy_(torch.from_numpy(w_in))
    tm.in_proj_bias.copy_(torch.from_numpy(b_in))
    tm.out_proj.weight.copy_(torch.from_numpy(w_out))
    tm.out_proj.bias.copy_(torch.from_numpy(b_out))
  tm.eval()
  attend = neighbor_mask(h, h, h // 2)
  t_mask = None
  if masked:
    blocked = torch.from_numpy(~attend)
    t_mask = blocked if torch_mask == "bool" else torch.zeros(n, n).masked_fill(blocked, -math.inf)
  with torch.no_grad():
    want = tm(torch.from_numpy(q_in), torch.from_numpy(kv_in), torch.from_numpy(v_in),
              attn_mask=t_mask)[0].numpy()

  params = {f"{name}_proj": {"kernel": w_in[i * d:(i + 1) * d].T, "bias": b_in[i * d:(i + 1) * d]}
            for i, name in enumerate("qkv")}
  params["out_proj"] = {"kernel": w_out.T, "bias": b_out}
  got = MultiheadAttention(d, heads, dropout=0.1).apply(
      {"params": params}, q_in, kv_in, v_in, attend if masked else None, deterministic=True)
  got = np.asarray(got)
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel <= 1e-4, rel
  assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want)) * 10


def test_attention_dropout_only_in_training():
  m = MultiheadAttention(32, 4, dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (1, 6, 32))
  v = m.init(jax.random.key(1), x, x, x)
  a = m.apply(v, x, x, x, deterministic=True)
  b = m.apply(v, x, x, x, deterministic=True)
  c = m.apply(v, x, x, x, deterministic=False, rngs={"dropout": _rngs(2)["dropout"]})
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3


# ------------------------------------------------------------------------------ neighbour mask


@pytest.mark.parametrize("h,window", [(14, 7), (16, 9), (20, 11)])
def test_neighbor_mask_windows(h, window):
  attend = neighbor_mask(h, h, h // 2)
  n = h * h
  assert attend.shape == (n, n) and attend.dtype == bool
  blocked = ~attend
  half = window // 2
  for y, x in [(h // 2, h // 2), (half, half), (h - 1 - half, h // 2)]:   # interior queries
    t = y * h + x
    assert blocked[t].sum() == window * window
    rows = np.nonzero(blocked[t])[0]
    ys, xs = np.divmod(rows, h)
    assert ys.min() == y - half and ys.max() == y + half
    assert xs.min() == x - half and xs.max() == x + half
  corner = blocked[0].sum()   # clipped at the border
  assert corner == (half + 1) ** 2
  np.testing.assert_array_equal(blocked, blocked.T)
  assert blocked.diagonal().all()


def test_neighbor_mask_rectangular():
  attend = neighbor_mask(4, 6, (2, 4))      # |dy| <= 1, |dx| <= 2
  t = 1 * 6 + 2
  assert (~attend[t]).sum() == 3 * 5


# ----------------------------------------------------------------------- parameters and init


def test_parameter_count_default():
  model = OneNIP.from_config(get_base_config().model)
  shapes = jax.eval_shape(lambda: model.init(_rngs(), jnp.zeros((2, 14, 14, C)),
                                             jnp.zeros((1, 14, 14, C)), train=False))
  p = shapes["params"]
  assert _count(p) == 8_372_625
  assert _count(p["input_proj"]) == 69_888 and _count(p["output_proj"]) == 69_904
  assert _count(p["pos_embed"]) == 3_584
  assert all(_count(p[f"encoder_layer{i}"]) == 789_760 for i in range(4))
  assert all(_count(p[f"decoder_layer{i}"]) == 1_053_440 for i in range(4))
  assert _count(p["final_attn"]) == 263_168 and _count(p["decoder_norm"]) == 512
  assert _count(p["refiner"]) == 592_769
  assert set(shapes["batch_stats"]["refiner"]) == {"bn1", "bn2"}


def test_from_config_reads_model_keys():
  cfg = get_base_config().model
  cfg.dtype = "bfloat16"
  cfg.decoder = "uniad"
  cfg.neighbor_size = 5
  cfg.bn_group_size = 4
  m = OneNIP.from_config(cfg)
  assert m.dtype == jnp.bfloat16 and m.decoder == "uniad" and m.neighbor_size == 5
  assert m.bn_group_size == 4 and m.hidden_dim == 256
  assert OneNIP.from_config(ml_collections.ConfigDict({"refiner": False})).refiner is False
  with pytest.raises(ValueError, match=r"config.model has keys that are no OneNIP field: \['backbone'\]"):
    OneNIP.from_config(ml_collections.ConfigDict({"backbone": "b4"}))


def test_from_config_is_onenip_of_config_model():
  """`config.model` holds exactly the network's fields: OneNIP(**config.model) builds the same
  network (same parameters and outputs) as from_config."""
  cfg = get_base_config().model
  cfg.update(hidden_dim=16, num_heads=2, ffn_dim=32, refiner_channels=8, bn_group_size=2, **SMALL)
  q, p = _feats(0, 2, 4), _feats(1, 2, 4)
  outs = []
  for model in (OneNIP(**cfg), OneNIP.from_config(cfg)):
    variables = model.init(_rngs(), q, p, train=False)
    outs.append(_np((variables, model.apply(variables, q, p, train=False))))
  jax.tree.map(np.testing.assert_array_equal, *outs)


def test_initialisation():
  """docs/algorithm.md §5.7 on a real init: packed in_proj bound, xavier elsewhere, zero biases, U[0,1) pos."""
  model = OneNIP(**SMALL)
  variables = jax.jit(lambda q, p: model.init(_rngs(), q, p, train=False))(
      jnp.zeros((1, 14, 14, C)), jnp.zeros((1, 14, 14, C)))
  p = jax.tree.map(np.asarray, variables["params"])
  in_bound = math.sqrt(6 / (256 + 768))
  for mod in (p["encoder_layer0"]["self_attn"], p["decoder_layer0"]["cross_attn_image_to_prompt"]):
    for name in ("q_proj", "k_proj", "v_proj"):
      k = mod[name]["kernel"]
      assert 0.95 * in_bound < np.abs(k).max() <= in_bound, name
    out_bound = math.sqrt(6 / 512)
    assert 0.95 * out_bound < np.abs(mod["out_proj"]["kernel"]).max() <= out_bound
  ffn = p["encoder_layer0"]["linear1"]["kernel"]          # (256, 1024)
  assert 0.95 * math.sqrt(6 / 1280) < np.abs(ffn).max() <= math.sqrt(6 / 1280)
  ip = p["input_proj"]["kernel"]
  assert ip.shape == (C, 256) and np.abs(ip).max() <= math.sqrt(6 / (C + 256))
  conv = p["refiner"]["conv1"]["kernel"]                  # (3, 3, 272, 128)
  assert conv.shape == (3, 3, C, 128)
  assert 0.95 * math.sqrt(6 / (9 * (C + 128))) < np.abs(conv).max() <= math.sqrt(6 / (9 * (C + 128)))
  deconv = p["refiner"]["deconv1"]["kernel"]              # 2x2, 128 -> 128: fans 512 + 512
  assert 0.95 * math.sqrt(6 / 1024) < np.abs(deconv).max() <= math.sqrt(6 / 1024)
  assert "bias" not in p["refiner"]["conv1"] and "bias" in p["refiner"]["deconv1"]
  for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]:
    name = jax.tree_util.keystr(leaf_path)
    assert leaf.dtype == np.float32, name
    if name.endswith("['bias']"):
      assert np.all(leaf == 0), name
    if name.endswith("['scale']"):
      assert np.all(leaf == 1), name
  for t in ("row_embed", "col_embed"):
    e = p["pos_embed"][t]
    assert e.shape == (14, 128) and e.min() >= 0 and e.max() < 1 and e.mean() > 0.4
  bs = variables["batch_stats"]["refiner"]["bn1"]
  assert np.all(bs["mean"] == 0) and np.all(bs["var"] == 1)


def test_position_embedding_layout():
  """pos[y * w + x] = concat(col_embed[x], row_embed[y]) (column part first)."""
  from onenip_jax.models.transformer import PositionEmbedding
  m = PositionEmbedding(3, 4, 8)
  v = m.init(jax.random.key(0))
  row, col = v["params"]["row_embed"], v["params"]["col_embed"]
  pos = m.apply(v)
  assert pos.shape == (12, 8)
  np.testing.assert_array_equal(pos[1 * 4 + 2], jnp.concatenate([col[2], row[1]]))


# ------------------------------------------------------------------------- forward behaviour


@functools.lru_cache(maxsize=None)
def _sweep_fn(model, with_eval):
  def f(variables, q, p, seed):
    out, state = model.apply(variables, q, p, train=True, rngs=_rngs(seed), mutable=["batch_stats"])
    ev = model.apply(variables, q[:p.shape[0]], p, train=False) if with_eval else None
    return out, state.get("batch_stats"), ev
  return jax.jit(f)


def _torch_upsample(x_nhwc, out_hw):
  torch = pytest.importorskip("torch")
  t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  y = torch.nn.functional.interpolate(t, size=out_hw, mode="bilinear", align_corners=True)
  return y.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("h", [14, 16, 20])
@pytest.mark.parametrize("b", [1, 3])
def test_shapes_and_finite(b, h):
  """Training layout (Bq = 2 Bp, prompt duplicated) and, for B = 1, eval layout (Bq = Bp); input
  16h x 16h. The default depth (4 + 4) at one setting, one layer of each kind elsewhere."""
  model = OneNIP(bn_group_size=2, **({} if (b, h) == (1, 14) else SMALL))
  variables = _random_variables(model, h)
  q = _feats(0, 2 * b, h) * 3.0
  p = _feats(1, b, h)
  out, stats, ev = _np(_sweep_fn(model, b == 1)(variables, q, p, 0))
  assert out["recon"].shape == (2 * b, h, h, C)
  assert out["rec"].shape == (2 * b, 16 * h, 16 * h, 1)
  assert out["ref_logit"].shape == (2 * b, 16 * h, 16 * h, 1)
  if ev is not None:
    assert ev["recon"].shape == (b, h, h, C) and ev["rec"].shape == (b, 16 * h, 16 * h, 1)
    assert ev["ref_logit"].shape == (b, 16 * h, 16 * h, 1)
  for o in (out, ev or {}):
    for k, v in o.items():
      assert v.dtype == np.float32, k
      assert np.isfinite(v).all(), k
  assert (out["rec"] >= 0).all()
  # rec is the x16 align-corners upsampling of the per-token error norm over channels.
  err = np.linalg.norm(out["recon"] - q, axis=-1, keepdims=True)
  np.testing.assert_allclose(out["rec"], _torch_upsample(err, (16 * h, 16 * h)), rtol=1e-4,
                             atol=1e-4)
  assert not np.allclose(stats["refiner"]["bn1"]["mean"], 0)   # running stats were updated
  if b == 1:   # jitter / dropout are random in training, eval is deterministic
    out2, _, ev2 = _np(_sweep_fn(model, True)(variables, q, p, 1))
    assert np.abs(out2["recon"] - out["recon"]).max() > 1e-3
    np.testing.assert_array_equal(ev2["recon"], ev["recon"])


def test_prompt_duplication_in_training_layout():
  """With dropout and jitter off, sample i of both halves is reconstructed from prompt i: the
  training-layout output equals eval-layout runs with (query row, prompt i)."""
  model = OneNIP(dropout=0.0, jitter_prob=0.0, refiner=False, **SMALL)
  variables = _random_variables(model, 14)
  q, p = _feats(0, 4, 14), _feats(1, 2, 14)
  out, _ = _train(model, variables, q, p)
  single = _eval(model, variables, q[1:3], p[::-1])  # rows 1 (normal 1) and 2 (synthetic 0)
  np.testing.assert_allclose(out["recon"][1:3], single["recon"], rtol=1e-4, atol=1e-4)
  swapped = _eval(model, variables, q[1:3], p)       # the prompt matters
  assert np.abs(np.asarray(swapped["recon"] - single["recon"])).max() > 1e-3


@pytest.mark.parametrize("decoder", ["unidirectional", "uniad"])
def test_decoder_variants(decoder):
  """Training mode (dropout/jitter off so that runs with different prompts are comparable)."""
  model = OneNIP(decoder=decoder, bn_group_size=2, dropout=0.0, jitter_prob=0.0, **SMALL)
  variables = _random_variables(model, 14)
  q, p = _feats(0, 2, 14), _feats(1, 1, 14)
  out, _ = _train(model, variables, q, p)
  assert out["recon"].shape == q.shape and out["ref_logit"].shape == (2, 224, 224, 1)
  assert all(np.isfinite(v).all() for v in out.values())
  layer = variables["params"]["decoder_layer0"]
  other, _ = _train(model, variables, q, p * 2.0 + 1.0)
  if decoder == "unidirectional":
    assert set(layer) == {"cross_attn_prompt_to_image", "mlp_lin1", "mlp_lin2", "norm1", "norm2"}
    assert np.abs(other["recon"] - out["recon"]).max() > 1e-3
  else:
    assert layer["learned_embed"].shape == (196, 256)
    assert set(layer) == {"learned_embed", "self_attn", "multihead_attn", "linear1", "linear2",
                          "norm1", "norm2", "norm3"}
    np.testing.assert_array_equal(other["recon"], out["recon"])    # prompt ignored


def test_bidirectional_structure():
  shapes = jax.eval_shape(lambda: OneNIP(**SMALL).init(_rngs(), jnp.zeros((1, 14, 14, C)),
                                                       jnp.zeros((1, 14, 14, C)), train=False))
  assert set(shapes["params"]["decoder_layer0"]) == {
      "cross_attn_prompt_to_image", "cross_attn_image_to_prompt", "mlp_lin1", "mlp_lin2",
      "norm1", "norm2", "norm3"}
  with pytest.raises(ValueError, match="decoder"):
    jax.eval_shape(lambda: OneNIP(decoder="nope").init(_rngs(), jnp.zeros((1, 14, 14, C)),
                                                       jnp.zeros((1, 14, 14, C)), train=False))
  with pytest.raises(ValueError, match="prompt batch"):
    jax.eval_shape(lambda: OneNIP().init(_rngs(), jnp.zeros((3, 14, 14, C)),
                                         jnp.zeros((2, 14, 14, C)), train=False))


def test_refiner_off_and_bfloat16():
  model = OneNIP(refiner=False, dtype=jnp.bfloat16, **SMALL)
  variables = _random_variables(model, 16)
  assert "batch_stats" not in variables
  q, p = _feats(0, 2, 16), _feats(1, 1, 16)
  out, stats = _train(model, variables, q, p)
  assert stats is None and out["ref_logit"] is None
  assert out["recon"].dtype == jnp.float32 and out["rec"].dtype == jnp.float32
  assert np.isfinite(out["recon"]).all() and out["rec"].shape == (2, 256, 256, 1)


def test_dice_gradient_reaches_transformer():
  """The refiner input |recon - query| is not detached (docs/algorithm.md §8.1): Dice alone trains the network."""
  model = OneNIP(bn_group_size=2, **SMALL)
  variables = _random_variables(model, 14)
  q, p = _feats(0, 2, 14), _feats(1, 1, 14)
  mask = jnp.zeros((2, 224, 224, 1)).at[1, 50:120, 60:100].set(1.0)

  @jax.jit
  def grads(params):
    def loss(params):
      out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, q, p,
                           train=True, rngs=_rngs(3), mutable=["batch_stats"])
      return dice_loss(jax.nn.sigmoid(out["ref_logit"]), mask)
    return jax.grad(loss)(params)

  g = _np(grads(variables["params"]))
  norm = lambda t: float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(t))))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
  for name in ["input_proj", "pos_embed", "encoder_layer0", "decoder_layer0", "final_attn",
               "decoder_norm", "output_proj", "refiner"]:
    assert norm(g[name]) > 1e-8, name
  for sub in ["cross_attn_prompt_to_image", "cross_attn_image_to_prompt", "mlp_lin1", "norm3"]:
    assert norm(g["decoder_layer0"][sub]) > 1e-8, sub
  for sub in ["self_attn", "linear1", "norm2"]:
    assert norm(g["encoder_layer0"][sub]) > 1e-8, sub


# -------------------------------------------------------------------------- grouped BatchNorm


def test_bn_groups_independent_of_batch_composition():
  """Training layout: group g = normal [g k, (g+1) k) + synthetic [g k, (g+1) k), k = 2. A batch
  holding 2 groups gives the same outputs (and mean running-stat update) as each group alone."""
  kw = dict(dropout=0.0, jitter_prob=0.0, **SMALL)
  model = OneNIP(bn_group_size=4, **kw)
  variables = _random_variables(model, 14)
  q, p = _feats(0, 8, 14) * 2.0, _feats(1, 4, 14)
  full, stats = _train(model, variables, q, p)
  parts = []
  for g in range(2):
    rows = np.array([2 * g, 2 * g + 1, 4 + 2 * g, 4 + 2 * g + 1])
    out, st = _train(model, variables, q[rows], p[2 * g:2 * g + 2])
    np.testing.assert_allclose(full["ref_logit"][rows], out["ref_logit"], rtol=1e-4, atol=1e-4)
    parts.append(st)
  for bn in ("bn1", "bn2"):
    for k in ("mean", "var"):
      avg = 0.5 * (parts[0]["refiner"][bn][k] + parts[1]["refiner"][bn][k])
      np.testing.assert_allclose(stats["refiner"][bn][k], avg, rtol=1e-5, atol=1e-6)
  # the check can fail: whole-batch statistics give a different answer
  whole, _ = _train(OneNIP(bn_group_size=0, **kw), variables, q, p)
  assert np.abs(whole["ref_logit"] - full["ref_logit"]).max() > 1e-3


def test_bn_consecutive_groups_running_stats_and_errors():
  kw = dict(dropout=0.0, jitter_prob=0.0, **SMALL)
  model = OneNIP(bn_group_size=2, **kw)
  variables = _random_variables(model, 14)
  q = _feats(0, 4, 14) * 2.0
  full, stats = _train(model, variables, q, q)       # Bq == Bp: consecutive groups of 2
  q2 = q.copy()
  q2[2:] = q2[2:] * 3.0 + 1.0                          # change the second group only
  changed, _ = _train(model, variables, q2, q2)
  np.testing.assert_allclose(full["ref_logit"][:2], changed["ref_logit"][:2], rtol=1e-4, atol=1e-4)
  assert np.abs(full["ref_logit"][2:] - changed["ref_logit"][2:]).max() > 1e-3
  # running update (momentum 0.9, unbiased variance) reproduced by hand for bn1
  pr = variables["params"]
  recon = full["recon"]
  x = jax.lax.conv_general_dilated(np.abs(recon - q), pr["refiner"]["conv1"]["kernel"], (1, 1),
                                   ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xg = np.asarray(x).reshape(2, 2 * 14 * 14, -1)
  want_mean = 0.1 * xg.mean(1).mean(0)
  want_var = 0.9 + 0.1 * xg.var(1, ddof=1).mean(0)
  np.testing.assert_allclose(stats["refiner"]["bn1"]["mean"], want_mean, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(stats["refiner"]["bn1"]["var"], want_var, rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match="model.bn_group_size"):
    _train(OneNIP(bn_group_size=3, **kw), variables, q, q)
  with pytest.raises(ValueError, match="model.bn_group_size"):   # 3 + 3 maps, groups of 2 + 2
    _train(OneNIP(bn_group_size=4, **kw), variables, _feats(0, 6, 14), _feats(1, 3, 14))
  # eval uses the running statistics: sample 2 is unaffected by a change of sample 3 (with batch
  # statistics in groups of 2 it would be)
  q3 = q.copy()
  q3[3] = q3[3] * 3.0 + 1.0
  ev, ev3 = _eval(model, variables, q, q)["ref_logit"], _eval(model, variables, q3, q3)["ref_logit"]
  np.testing.assert_allclose(ev[:3], ev3[:3], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- neck


def test_neck_concatenates_resized_taps():
  rng = np.random.default_rng(0)
  taps = [jnp.asarray(rng.normal(size=(2, s, s, c)), jnp.float32)
          for s, c in [(112, 24), (56, 32), (28, 56), (14, 160)]]
  f = neck(taps, (14, 14))
  assert f.shape == (2, 14, 14, 272)
  np.testing.assert_array_equal(f[..., -160:], taps[3])
  np.testing.assert_allclose(f[..., :24], resize_align_corners(taps[0], (14, 14)))
  np.testing.assert_allclose(f[:, 0, 0, 24:56], taps[1][:, 0, 0])      # corner samples


def test_refiner_matches_torch_eval():
  """Refiner layers vs a PyTorch MaskHead (eval-mode BN): padding, no-bias conv, BN eps, transposed
  conv layout. Torch ConvTranspose2d weight (in, out, kh, kw) -> Flax kernel (kh, kw, in, out) with
  both spatial axes flipped (Flax's ConvTranspose with transpose_kernel=False)."""
  torch = pytest.importorskip("torch")
  from onenip_jax.models.refiner import Refiner
  tnn = torch.nn
  cin, ch, h = 8, 6, 5
  torch.manual_seed(0)
  layers = []
  for i in range(2):
    layers += [tnn.Conv2d(cin if i == 0 else ch, ch, 3, padding=1, bias=False), tnn.BatchNorm2d(ch),
               tnn.ReLU(), tnn.ConvTranspose2d(ch, ch, 2, stride=2)]
  layers.append(tnn.Conv2d(ch, 1, 1))
  head = tnn.Sequential(*layers).eval()
  with torch.no_grad():
    for mod in head:
      if isinstance(mod, tnn.BatchNorm2d):
        for t in (mod.weight, mod.bias, mod.running_mean):
          t.copy_(torch.randn_like(t) * 0.5)
        mod.running_var.copy_(torch.rand_like(mod.running_var) + 0.5)
  x = np.random.default_rng(0).normal(size=(2, h, h, cin)).astype(np.float32)
  with torch.no_grad():
    want = head(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  t = lambda w: w.detach().numpy()
  params, stats = {}, {}
  for i, (conv, bn, deconv) in enumerate([(0, 1, 3), (4, 5, 7)], start=1):
    params[f"conv{i}"] = {"kernel": t(head[conv].weight).transpose(2, 3, 1, 0)}
    params[f"bn{i}"] = {"scale": t(head[bn].weight), "bias": t(head[bn].bias)}
    stats[f"bn{i}"] = {"mean": t(head[bn].running_mean), "var": t(head[bn].running_var)}
    params[f"deconv{i}"] = {"kernel": t(head[deconv].weight).transpose(2, 3, 0, 1),
                            "bias": t(head[deconv].bias)}
  params["predictor"] = {"kernel": t(head[8].weight).transpose(2, 3, 1, 0),
                         "bias": t(head[8].bias)}
  got = Refiner(ch).apply({"params": params, "batch_stats": stats}, x, train=False)
  assert got.shape == (2, 4 * h, 4 * h, 1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
