"""metric_logging.MetricLogger: train scalars, evaluations, heatmaps and hyper-parameters reach
TensorBoard and train_log.jsonl, through tf.io.gfile (here on TensorFlow's ram:// file system)."""
import io
import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("clu")

from onenip_jax.config import base as common  # noqa: E402
from onenip_jax.training import metric_logging  # noqa: E402


def _events(logdir: str) -> dict:
  """{tag: [(step, value or image shape)]} of every event file under `logdir`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = {}
  for name in tf.io.gfile.listdir(logdir):
    for event in tf.compat.v1.train.summary_iterator(f"{logdir}/{name}"):
      for v in event.summary.value:
        t = tf.make_ndarray(v.tensor)
        if v.metadata.plugin_data.plugin_name == "images":  # [width, height, png, ...]
          t = np.asarray(Image.open(io.BytesIO(t[2]))).shape
        out.setdefault(v.tag, []).append((event.step, t if isinstance(t, tuple) or t.size != 1
                                          else t.item()))
  return out


def test_scalars_evaluations_heatmaps_and_hparams(tmp_path):
  workdir = "ram://metric_logging_test/run"
  eval_dir = f"{workdir}/eval/step_4"
  sheet = np.zeros((20, 30, 3), np.uint8)
  sheet[:, :10, 0] = 255
  tf.io.gfile.makedirs(f"{eval_dir}/heatmaps/bottle")
  buf = io.BytesIO()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(sheet).save(buf, format="PNG")
  with tf.io.gfile.GFile(f"{eval_dir}/heatmaps/bottle/contact_sheet.png", "wb") as f:
    f.write(buf.getvalue())
  result = {"mean": {"i_auroc": 0.75, "p_auroc": None, "n_images": 10},
            "classes": {"bottle": {"i_auroc": 0.75, "p_auroc": None, "n_images": 10}}}

  logger = metric_logging.MetricLogger(workdir, enabled=True)
  logger.hparams(common.get_base_config())
  logger.scalars(2, {"total": np.float32(1.5), "lr": 1e-4, "grad_norm": 3.0})
  logger.evaluation(4, result, eval_dir)
  logger.close()

  with tf.io.gfile.GFile(f"{workdir}/train_log.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows[0] == {"step": 2, "total": 1.5, "lr": 1e-4, "grad_norm": 3.0}
  assert rows[1] == {"step": 4, "eval/i_auroc": 0.75, "eval/bottle/i_auroc": 0.75}
  events = _events(f"{workdir}/tb")
  assert events["total"] == [(2, 1.5)] and events["grad_norm"] == [(2, 3.0)]
  assert events["eval/i_auroc"] == [(4, 0.75)] and events["eval/bottle/i_auroc"] == [(4, 0.75)]
  assert "eval/p_auroc" not in events and "eval/n_images" not in events
  assert events["heatmaps/bottle"] == [(4, (20, 30, 3))]
  assert any(tag.startswith("_hparams_") for tag in events)


def test_other_processes_write_nothing():
  logger = metric_logging.MetricLogger("ram://metric_logging_test/off", enabled=False)
  logger.scalars(1, {"total": 1.0})
  logger.evaluation(1, {"mean": {"i_auroc": 0.5}}, None)
  logger.hparams(common.get_base_config())
  logger.close()
  assert not tf.io.gfile.exists("ram://metric_logging_test/off")
