"""Every experiment config builds; bad arguments, keys and paths fail with a clear message."""
import importlib
import subprocess
import sys

import pytest

from conftest import REPO

CONFIGS = ["mvtec", "btad", "visa", "mvtec_btad_visa", "ablation", "real", "demo"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_with_defaults(name):
  cfg = importlib.import_module(f"configs.{name}").get_config()
  assert cfg.input_size % 32 == 0 and cfg.batch_size > 0
  assert cfg.model.backbone and cfg.data.layout


def test_config_arguments():
  from configs import ablation, mvtec, visa  # pylint: disable=g-import-not-at-top
  c = mvtec.get_config("res=320,backbone=lite2")
  assert c.input_size == 320 and c.model.backbone == "lite2" and c.data.mean[0] == pytest.approx(127 / 255)
  assert visa.get_config("layout=visa_csv").data.visa_csv.endswith("split_csv/1cls.csv")
  a = ablation.get_config("variant=no_refiner,enc=2")
  assert (a.model.refiner, a.model.restoration, a.model.enc_layers) == (False, True, 2)
  with pytest.raises(ValueError, match="resolution"):
    mvtec.get_config("resolution=224")
  with pytest.raises(ValueError, match="variant='nope'"):
    ablation.get_config("variant=nope")


def _train_cli(*args):
  return subprocess.run([sys.executable, "-m", "onenip_jax.train", "--workdir=/tmp/onenip-cli-test",
                         *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_key_and_missing_data():
  out = _train_cli("--config=configs/demo.py", "--config.model.no_such_key=1")
  assert out.returncode != 0 and "no_such_key" in out.stderr
  out = _train_cli("--config=configs/real.py", "--config.data.root=/nonexistent/data")
  assert out.returncode != 0 and "/nonexistent/data" in out.stderr
