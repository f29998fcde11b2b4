"""Every experiment config builds; config files load by path (also outside the repository); a
stored config of the old layout (backbone keys in `model`) is translated before any use; bad
arguments, keys and paths fail with a clear message."""
import json
import shutil
import subprocess
import sys

import ml_collections
import orbax.checkpoint as ocp
import pytest

from conftest import REPO
from onenip_jax.config import loading
from onenip_jax.training import checkpoints, run_control

CONFIGS = ["mvtec", "btad", "visa", "mpdd", "mvtec_btad_visa", "ablation", "real", "demo"]


def _load(name_and_arg: str) -> ml_collections.ConfigDict:
  return loading.load_config(str(REPO / "configs" / name_and_arg))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_with_defaults(name):
  cfg = _load(f"{name}.py")
  assert cfg.input_size % 32 == 0 and cfg.batch_size > 0
  assert cfg.backbone.name and cfg.data.layout
  assert set(cfg.backbone) == {"name", "weights", "padding", "dtype"}


def test_config_arguments():
  c = _load("mvtec.py:res=320,backbone=lite2")
  assert c.input_size == 320 and c.backbone.name == "lite2" and c.data.mean[0] == pytest.approx(127 / 255)
  v = _load("visa.py")
  assert (v.data.layout, v.data.visa_csv, len(v.data.classes)) == ("visa_csv", "", 12)
  v = _load("visa.py:layout=meta")
  assert (v.data.meta_train, v.data.classes) == ("data/VisA/train.json", ())
  a = _load("ablation.py:variant=no_refiner,enc=2")
  assert (a.model.refiner, a.loss.restoration, a.model.enc_layers) == (False, True, 2)
  assert _load("ablation.py:variant=uniad").loss.restoration is False
  with pytest.raises(ValueError, match="resolution"):
    _load("mvtec.py:resolution=224")
  with pytest.raises(ValueError, match="variant='nope'"):
    _load("ablation.py:variant=nope")


def test_config_file_outside_the_repository(tmp_path, monkeypatch):
  """A copy elsewhere loads by path with its argument; the ablation finds its sibling file."""
  for name in ("ablation.py", "mvtec.py"):
    shutil.copy(REPO / "configs" / name, tmp_path / f"my_{name}" if name == "ablation.py"
                else tmp_path / name)
  monkeypatch.chdir(tmp_path)
  c = loading.load_config(str(tmp_path / "my_ablation.py") + ":variant=uniad,res=64",
                          ["model.dec_layers=2"])
  assert (c.model.decoder, c.input_size, c.model.dec_layers) == ("uniad", 64, 2)
  (tmp_path / "bad.py").write_text("X = 1\n")
  with pytest.raises(ValueError, match=r"bad.py has no get_config"):
    loading.load_config(str(tmp_path / "bad.py"))


# The `model` section as configs/common.py wrote it before `config.backbone` (stored runs hold it).
_OLD_MODEL = {
    "backbone": "lite0", "backbone_weights": "", "backbone_padding": "same", "hidden_dim": 256,
    "num_heads": 8, "ffn_dim": 1024, "dropout": 0.1, "enc_layers": 4, "dec_layers": 4,
    "jitter_scale": 20.0, "jitter_prob": 1.0, "neighbor_mask": True, "neighbor_size": 0,
    "decoder": "bidirectional", "restoration": True, "refiner": True, "refiner_channels": 128,
    "bn_group_size": 16, "dtype": "float32"}


def _old_layout(cfg: ml_collections.ConfigDict) -> dict:
  """`cfg` as a run of the old layout stored it (JSON); sets `cfg`'s dtypes to the float32 such a
  run had (it knew no 'auto')."""
  cfg.model.dtype = cfg.model.matmul_dtype = cfg.backbone.dtype = "float32"
  old = json.loads(cfg.to_json_best_effort())
  assert old.pop("backbone") == {"name": "lite0", "weights": "", "padding": "same",
                                 "dtype": "float32"}
  assert old["loss"].pop("restoration") is True
  old["model"] = dict(_OLD_MODEL)
  return old


def _demo():
  return loading.load_config(str(REPO / "configs" / "demo.py"), ["backbone.padding=same"])


def test_old_stored_layout_is_translated():
  cfg = _demo()
  old = _old_layout(cfg)
  new = loading.upgrade_stored_config(old)
  assert run_control.config_differences(new, cfg) == {}
  assert old["model"] == _OLD_MODEL  # the stored dict is not changed
  assert loading.upgrade_stored_config(new) == new  # the current layout passes unchanged
  # An old run evaluated with its stored config (onenip-eval --workdir / --exported).
  loaded = loading.load_config(None, ["eval.batch_size=4"],
                               base=ml_collections.ConfigDict(old))
  assert (loaded.backbone.name, loaded.backbone.padding, loaded.eval.batch_size) == ("lite0", "same", 4)
  assert "backbone" not in loaded.model and loaded.loss.restoration is True


def test_old_run_resumes_with_the_new_layout(tmp_path):
  """A checkpoint's stored config of the old layout reads back translated, so check_resume
  compares like with like: the same settings resume, a changed backbone still fails."""
  cfg = _demo()
  workdir = str(tmp_path / "run")
  manager = checkpoints.make_manager(workdir, cfg)
  manager.save(3, args=ocp.args.Composite(config=ocp.args.JsonSave(_old_layout(cfg))))
  manager.wait_until_finished()
  step, stored = checkpoints.latest_config(manager)
  manager.close()
  assert step == 3 and stored["backbone"]["name"] == "lite0"
  run_control.check_resume(stored, cfg, workdir, step)
  assert checkpoints.restore_config(workdir).backbone.padding == "same"
  cfg.backbone.name = "lite1"
  with pytest.raises(run_control.ConfigMismatch, match=r"backbone.name: 'lite0' \(stored\)"):
    run_control.check_resume(stored, cfg, workdir, step)


def test_a_run_from_before_calibration_held_nothing_out(tmp_path):
  """A stored config without `calibration` (nothing was held out) reads back with
  holdout_fraction 0: it resumes with the same setting, and names the key otherwise."""
  cfg = _demo()
  stored = json.loads(cfg.to_json_best_effort())
  del stored["calibration"]
  new = loading.upgrade_stored_config(stored)
  assert new["calibration"] == {"holdout_fraction": 0.0}
  cfg.calibration.holdout_fraction = 0.0
  run_control.check_resume(new, cfg, str(tmp_path), 7)  # the other calibration keys are harmless
  cfg.calibration.holdout_fraction = 0.1
  with pytest.raises(run_control.ConfigMismatch,
                     match=r"calibration.holdout_fraction: 0.0 \(stored\) -> 0.1"):
    run_control.check_resume(new, cfg, str(tmp_path), 7)


def _train_cli(*args):
  return subprocess.run([sys.executable, "-m", "onenip_jax.cli", "train",
                         "--workdir=/tmp/onenip-cli-test", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_key_and_missing_data():
  out = _train_cli("--config=configs/demo.py", "--config.model.no_such_key=1")
  assert out.returncode != 0 and "no_such_key" in out.stderr
  out = _train_cli("--config=configs/real.py", "--config.data.root=/nonexistent/data")
  assert out.returncode != 0 and "/nonexistent/data" in out.stderr
