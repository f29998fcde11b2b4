"""Layout "tfds": the built-in demo data as record shards (local and `ram://`) gives the folder
layout's index, batches, training losses and metrics, each process reading only its records."""
import json
import os
import subprocess
import sys
import uuid

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from conftest import REPO, train_losses
from data_pipelines import demo_data, indexing, input_pipeline, records, storage

pytest.importorskip("importlib_resources", reason="tensorflow_datasets needs importlib_resources")
tfds = pytest.importorskip("tensorflow_datasets", reason="the `tfds` extra is not installed")

# pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import tfds_builder
from onenip_jax import cli, train
from onenip_jax.config import base as base_lib
from onenip_jax.config import loading
from onenip_jax.serving import program
from onenip_jax.training import run_control

STEPS = 4


def _cfg(data: dict):
  c = base_lib.get_base_config()
  base_lib.set_backbone(c, "lite0")
  c.input_size, c.batch_size, c.total_steps = 64, 8, STEPS
  c.data.update(data)
  c.data.textures = ""
  c.eval.every_epochs, c.eval.batch_size, c.eval.fusion_max_images = 0, 8, 16
  c.eval.heatmaps, c.eval.max_heatmaps_per_class = True, 2
  c.ckpt.every_steps, c.log_every_steps = 100, 1
  c.calibration.synthetic_per_image = 2
  return c


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
  """A persistent compilation cache for this module only: the run from the records reuses the
  reference run's XLA programs (same shapes) instead of compiling them again."""
  values = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
            "jax_persistent_cache_min_compile_time_secs": 0,
            "jax_persistent_cache_min_entry_size_bytes": 0}
  old = {k: getattr(jax.config, k) for k in values}
  compilation_cache.reset_cache()
  for k, v in values.items():
    jax.config.update(k, v)
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """(folder data.* keys, local tfds data.* keys, ram:// tfds data.* keys); the data sets are
  built with the `onenip-build-tfds` command (in this process: ram:// is per process)."""
  base = tmp_path_factory.mktemp("tfds")
  root = demo_data.make_demo_dataset(str(base / "demo"), size=96, num_train=12, num_test_good=3,
                                     num_test_bad=3)
  folder = {"layout": "mvtec", "root": root}
  out = [folder]
  for data_dir in (str(base / "tfds"), f"ram://tfds-{uuid.uuid4().hex}"):
    cli.build_tfds(["--config", str(REPO / "configs" / "demo.py"), "--data-dir", data_dir, "--name", "demo",
                    "--config.data.layout=mvtec", f"--config.data.root={root}"])
    out.append({"layout": "tfds", "tfds_name": "demo", "tfds_data_dir": data_dir})
  return out


@pytest.fixture(scope="module")
def folder_run(demo, tmp_path_factory):
  """The reference: a tiny training run (+ its evaluation) from the folders."""
  workdir = str(tmp_path_factory.mktemp("folder_run") / "work")
  train.train_and_evaluate(_cfg(demo[0]), workdir)
  return workdir


def _key(s):
  return s.path, s.cls, s.label, s.mask_path, s.defect


@pytest.mark.parametrize("where", [1, 2], ids=["local", "ram"])
def test_index_is_the_folder_layouts_without_reading_an_image(demo, where, monkeypatch):
  want = indexing.index_config(_cfg(demo[0]))

  def no_reads(*args):
    raise AssertionError(f"indexing read image bytes: {args}")

  monkeypatch.setattr(storage, "read_range", no_reads)
  monkeypatch.setattr(indexing.image_checks, "probe_all", no_reads)
  got = indexing.index_config(_cfg(demo[where]))
  monkeypatch.undo()
  assert got.classes == want.classes == ("brick", "grass", "gravel")
  for split in ("train", "test", "holdout"):
    a, b = getattr(got, split), getattr(want, split)
    assert [_key(s) for s in a] == [_key(s) for s in b] and b, split
  assert sum(bool(s.mask_path) for s in got.test) == 9
  for a, b in zip(got.train + got.test + got.holdout, want.train + want.test + want.holdout):
    assert a.image_record[0].startswith(demo[where]["tfds_data_dir"]) and not b.image_record
    assert a.read_image() == b.read_image()
    assert bool(a.mask_record) == bool(b.mask_path)
    if b.mask_path:
      assert a.read_mask() == b.read_mask()
  # data.classes selects classes in its order, as for the folders.
  sub = indexing.index_dataset({**demo[where], "classes": ("gravel", "brick")})
  ref = indexing.index_dataset({**demo[0], "classes": ("gravel", "brick")})
  assert sub.classes == ref.classes and [_key(s) for s in sub.test] == [_key(s) for s in ref.test]


def test_local_records_are_indexed_and_read_without_tensorflow(demo):
  """What the serialised predictor's evaluation (`onenip-eval --exported`) needs of the data."""
  code = ("import sys, json; from data_pipelines import indexing; "
          "index = indexing.index_dataset(json.loads(sys.argv[1])); "
          "assert len(index.test[-1].read_image()) > 0 and index.test[-1].read_mask(); "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  proc = subprocess.run([sys.executable, "-c", code, json.dumps(demo[1])], capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_local_data_set_is_a_tfds_data_set(demo):
  index = indexing.index_dataset(demo[0])
  builder = tfds.builder_from_directory(records.dataset_dir(demo[1]["tfds_data_dir"], "demo"))
  for split, samples in (("train", index.train), ("test", index.test)):
    rows = list(builder.as_dataset(split=split).as_numpy_iterator())
    assert len(rows) == len(samples)
    for k, (r, s) in enumerate(zip(rows, samples)):
      assert r["index"] == k and r["path"].decode() == s.path and r["label"] == s.label
      assert r["class_id"] == index.class_id(s.cls) and r["defect"].decode() == s.defect
      assert r["image"] == s.read_image()
      assert r["mask"] == (s.read_mask() if s.mask_path else b"")


def test_builder_keeps_a_built_data_set_and_refuses_another_source(demo):
  data_dir = demo[2]["tfds_data_dir"]
  target = records.dataset_dir(data_dir, "demo")
  assert tfds_builder.build(demo[0], data_dir, "demo") == target
  with pytest.raises(ValueError, match="onenip_samples.json was built from another source"):
    tfds_builder.build({**demo[0], "classes": ("brick",)}, data_dir, "demo")
  with pytest.raises(ValueError, match="layout='tfds' is what this builds"):
    tfds_builder.build(demo[2], data_dir, "again")
  with pytest.raises(ValueError, match=r"no data set data.tfds_name='nope'.*onenip-build-tfds"):
    indexing.index_dataset({**demo[2], "tfds_name": "nope"})
  with pytest.raises(ValueError, match="needs data.tfds_data_dir and data.tfds_name"):
    indexing.index_dataset({"layout": "tfds"})
  with pytest.raises(ValueError, match=r"data.classes \['nope'\] not in"):
    indexing.index_dataset({**demo[2], "classes": ("nope",)})


def test_each_process_decodes_its_share_from_the_records(demo, monkeypatch):
  cfg_f, cfg_t = _cfg(demo[0]), _cfg(demo[2])
  index_f, index_t = indexing.index_config(cfg_f), indexing.index_config(cfg_t)
  reads = []
  read_range = storage.read_range
  monkeypatch.setattr(storage, "read_range",
                      lambda *a: reads.append(tuple(a)) or read_range(*a))
  for p in (0, 1):
    reads.clear()
    got = list(input_pipeline.make_eval_iterator(index_t.test, index_t, cfg_t, batch_size=8,
                                                 process_index=p, process_count=2))
    want = list(input_pipeline.make_eval_iterator(index_f.test, index_f, cfg_f, batch_size=8,
                                                  process_index=p, process_count=2))
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
      for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Exactly this process's images, masks and prompts: nothing of the other process's share.
    mine = [i for b in want for i in b["index"][b["valid"]]]
    expect = ([index_t.test[i].image_record for i in mine]
              + [index_t.test[i].mask_record for i in mine if index_t.test[i].mask_record]
              + [index_t.train[i].image_record for b in want for i in b["prompt_index"][b["valid"]]])
    assert sorted(reads) == sorted(expect)
  reads.clear()
  it_t = input_pipeline.make_train_iterator(index_t, cfg_t, process_index=1, process_count=2)
  it_f = input_pipeline.make_train_iterator(index_f, cfg_f, process_index=1, process_count=2)
  for _ in range(2):
    a, b = next(it_t), next(it_f)
    for k in b:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert {r[0] for r in reads} == {index_t.train[0].image_record[0]}
  # The heatmaps' and the serialised predictor's loaders read the same pixels from the records.
  s_t, s_f = index_t.test[-1], index_f.test[-1]
  np.testing.assert_array_equal(input_pipeline.load_image(s_t.read_image(), 64),
                                input_pipeline.load_image(s_f.path, 64))
  np.testing.assert_array_equal(program.load_image(s_t.read_image(), 64),
                                program.load_image(s_f.path, 64))
  np.testing.assert_array_equal(program.load_mask(s_t.read_mask(), 64),
                                program.load_mask(s_f.mask_path, 64))


def _metrics(*path):
  """metrics.json without its `config` (which names the data source)."""
  m = json.loads(storage.read_text(storage.join(*path, "metrics.json")))
  return {k: v for k, v in m.items() if k != "config"}, m["config"]["data"]


def test_training_evaluation_and_export_from_ram_records_match_the_folders(demo, folder_run):
  workdir = f"ram://run-{uuid.uuid4().hex}"
  train.train_and_evaluate(_cfg(demo[2]), workdir)
  want = train_losses(folder_run)
  assert sorted(want) == list(range(1, STEPS + 1))
  rows = [json.loads(line) for line in storage.read_text(workdir + "/train_log.jsonl").splitlines()
          if line.strip()]
  assert {r["step"]: r["total"] for r in rows if "total" in r} == want
  step = os.path.join("eval", f"step_{STEPS}")
  (got, data), (ref, _) = _metrics(workdir, step), _metrics(folder_run, step)
  assert got == ref and ref["fusion"] == "calibrated" and data["layout"] == "tfds"
  heatmaps = os.path.join(step, "heatmaps", "brick")
  assert sorted(storage.listdir(storage.join(workdir, heatmaps))) == sorted(
      os.listdir(os.path.join(folder_run, heatmaps)))
  # The serialised predictor (numpy/PIL decoding) scores the records as it scores the files.
  export_dir = storage.join(workdir, "export")
  cli.export(["--workdir", workdir, "--out", export_dir])
  cli.evaluate(["--exported", export_dir, "--out", storage.join(workdir, "x_tfds")])
  cli.evaluate(["--exported", export_dir, "--out", storage.join(workdir, "x_folder"),
                "--config.data.layout=mvtec", f"--config.data.root={demo[0]['root']}"])
  (got, data), (ref, ref_data) = _metrics(workdir, "x_tfds"), _metrics(workdir, "x_folder")
  assert got == ref and (data["layout"], ref_data["layout"]) == ("tfds", "mvtec")
  storage.rmtree(workdir)


def test_a_run_stored_before_layout_tfds_resumes(tmp_path):
  cfg = _cfg({"layout": "mvtec", "root": str(tmp_path)})
  stored = json.loads(cfg.to_json_best_effort())
  del stored["data"]["tfds_name"], stored["data"]["tfds_data_dir"]
  run_control.check_resume(loading.upgrade_stored_config(stored), cfg, str(tmp_path), 3)
