"""The dataset configs read each public download as it unpacks: miniatures with the real folder and
file names, indexed through `configs/X.py` loaded as the CLI loads it. Every path setting and path
flag expands `~` and `$VAR` (an unset variable fails, naming the setting)."""
import collections
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from data_pipelines import indexing
from onenip_jax import cli
from onenip_jax.config import loading
from onenip_jax.serving import predict

MVTEC = loading.load_python_file(str(REPO / "configs" / "mvtec.py")).CLASSES
BTAD = loading.load_python_file(str(REPO / "configs" / "btad.py")).CLASSES
VISA = loading.load_python_file(str(REPO / "configs" / "visa.py")).CLASSES


def _img(path: pathlib.Path, seed: int = 0, size=(24, 20)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(a).save(path)


def _mask(path: pathlib.Path, size=(24, 20)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  m = np.zeros((size[1], size[0]), np.uint8)
  m[4:9, 5:12] = 255
  Image.fromarray(m).save(path)


def _mvtec_download(root: pathlib.Path, defects: dict, n_train: int = 3) -> pathlib.Path:
  """mvtec_anomaly_detection/ (or MPDD/) as unpacked: <class>/train/good/NNN.png, test/good,
  test/<defect>/NNN.png, ground_truth/<defect>/NNN_mask.png, and the loose text files."""
  root.mkdir(parents=True)
  (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")
  (root / "readme.txt").write_text("MVTec AD\n")
  for cls, names in defects.items():
    for i in range(n_train):
      _img(root / cls / "train" / "good" / f"{i:03d}.png", seed=i)
    _img(root / cls / "test" / "good" / "000.png", seed=7)
    for d in names:
      for i in range(2):
        _img(root / cls / "test" / d / f"{i:03d}.png", seed=20 + i)
        _mask(root / cls / "ground_truth" / d / f"{i:03d}_mask.png")
  return root


def _btad_download(root: pathlib.Path) -> pathlib.Path:
  """BTech_Dataset_transformed/ as unpacked: 0N/train/ok, test/ok, test/ko, ground_truth/ko; masks
  named like their image, extensions as shipped (01: .bmp / .png, 02: .png / .png, 03: .bmp / .bmp)."""
  for cls, ext, mask_ext in (("01", "bmp", "png"), ("02", "png", "png"), ("03", "bmp", "bmp")):
    for i in range(3):
      _img(root / cls / "train" / "ok" / f"{i:04d}.{ext}", seed=i)
    _img(root / cls / "test" / "ok" / f"0000.{ext}", seed=7)
    for i in range(2):
      _img(root / cls / "test" / "ko" / f"{i:04d}.{ext}", seed=20 + i)
      _mask(root / cls / "ground_truth" / "ko" / f"{i:04d}.{mask_ext}")
  return root


def _visa_download(root: pathlib.Path, classes) -> pathlib.Path:
  """VisA as unpacked: <object>/Data/Images/{Normal,Anomaly}, Data/Masks/Anomaly, image_anno.csv;
  split_csv/1cls.csv (and a 2cls split that must not be read); LICENSE-DATASET."""
  one_cls, two_cls = ["object,split,label,image,mask"], ["object,split,label,image,mask"]
  for c in classes:
    for i in range(4):
      rel = f"{c}/Data/Images/Normal/{i:04d}.JPG"
      _img(root / rel, seed=i)
      one_cls.append(f"{c},{'train' if i < 3 else 'test'},normal,{rel},")
      two_cls.append(f"{c},train,normal,{rel},")
    for i in range(2):
      rel, mask = f"{c}/Data/Images/Anomaly/{i:03d}.JPG", f"{c}/Data/Masks/Anomaly/{i:03d}.png"
      _img(root / rel, seed=20 + i)
      _mask(root / mask)
      one_cls.append(f"{c},test,anomaly,{rel},{mask}")
    (root / c / "image_anno.csv").write_text("image,label,mask\n")
  (root / "split_csv").mkdir()
  (root / "split_csv" / "1cls.csv").write_text("\n".join(one_cls) + "\n")
  (root / "split_csv" / "2cls_highshot.csv").write_text("\n".join(two_cls) + "\n")
  (root / "LICENSE-DATASET").write_text("CC BY 4.0\n")
  return root


def _index(config: str, *overrides: str) -> indexing.DatasetIndex:
  cfg = loading.load_config(str(REPO / "configs" / config), list(overrides))
  return indexing.index_dataset(cfg.data)


def _counts(idx) -> collections.Counter:
  return collections.Counter((s.cls, s.defect, s.label) for s in idx.test)


def _masks_pair_by_stem(samples, suffix: str = "") -> None:
  """Anomalies, and only they, have a mask, named `<image stem><suffix>.*`."""
  for s in samples:
    assert (s.mask_path is not None) == bool(s.label), s
    if s.mask_path:
      assert pathlib.Path(s.mask_path).stem == pathlib.Path(s.path).stem + suffix


def test_mvtec_download(tmp_path):
  root = _mvtec_download(tmp_path / "mvtec_anomaly_detection",
                         {"bottle": ("broken_large", "contamination"), "screw": ("thread_top",)})
  idx = _index("mvtec.py:res=256", f"--config.data.root={root}",
               "--config.data.classes=('bottle', 'screw')")
  assert idx.classes == ("bottle", "screw")
  assert collections.Counter(s.cls for s in idx.train) == {"bottle": 3, "screw": 3}
  assert _counts(idx) == {("bottle", "good", 0): 1, ("bottle", "broken_large", 1): 2,
                          ("bottle", "contamination", 1): 2, ("screw", "good", 0): 1,
                          ("screw", "thread_top", 1): 2}
  _masks_pair_by_stem(idx.test, "_mask")
  assert all(pathlib.Path(s.mask_path).parent == root / s.cls / "ground_truth" / s.defect
             for s in idx.test if s.label)
  # By default every one of the 15 classes is expected: a partial download names what is missing.
  with pytest.raises(ValueError, match=r"data.classes \['cable', 'capsule', .*'zipper'\] not found "
                     r".*available: \['bottle', 'screw'\]"):
    _index("mvtec.py", f"--config.data.root={root}")


def test_mpdd_download(tmp_path):
  root = _mvtec_download(tmp_path / "MPDD", {"bracket_black": ("hole", "scratches"),
                                             "tubes": ("anomalous",)}, n_train=2)
  idx = _index("mpdd.py", f"--config.data.root={root}",
               "--config.data.classes=('bracket_black', 'tubes')")
  assert idx.classes == ("bracket_black", "tubes")
  assert len(idx.train) == 4
  assert _counts(idx) == {("bracket_black", "good", 0): 1, ("bracket_black", "hole", 1): 2,
                          ("bracket_black", "scratches", 1): 2, ("tubes", "good", 0): 1,
                          ("tubes", "anomalous", 1): 2}
  _masks_pair_by_stem(idx.test, "_mask")
  assert loading.load_config(str(REPO / "configs" / "mpdd.py")).data.classes == (
      "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")


def test_btad_download(tmp_path):
  root = _btad_download(tmp_path / "BTech_Dataset_transformed")
  idx = _index("btad.py", f"--config.data.root={root}")
  assert idx.classes == ("01", "02", "03")
  assert collections.Counter(s.cls for s in idx.train) == {"01": 3, "02": 3, "03": 3}
  assert _counts(idx) == {(c, d, lab): n for c in ("01", "02", "03")
                          for d, lab, n in (("good", 0, 1), ("ko", 1, 2))}
  _masks_pair_by_stem(idx.test)
  masks = {os.path.relpath(s.path, root): os.path.relpath(s.mask_path, root)
           for s in idx.test if s.mask_path}
  assert masks["01/test/ko/0001.bmp"] == "01/ground_truth/ko/0001.png"
  assert masks["02/test/ko/0001.png"] == "02/ground_truth/ko/0001.png"
  assert masks["03/test/ko/0000.bmp"] == "03/ground_truth/ko/0000.bmp"


def test_visa_download(tmp_path):
  root = _visa_download(tmp_path / "VisA", ("candle", "pcb1"))
  idx = _index("visa.py", f"--config.data.root={root}",
               "--config.data.classes=('candle', 'pcb1')")
  assert idx.classes == ("candle", "pcb1")
  assert collections.Counter(s.cls for s in idx.train) == {"candle": 3, "pcb1": 3}  # 1cls.csv
  assert _counts(idx) == {("candle", "good", 0): 1, ("candle", "anomaly", 1): 2,
                          ("pcb1", "good", 0): 1, ("pcb1", "anomaly", 1): 2}
  _masks_pair_by_stem(idx.test)
  assert all(pathlib.Path(s.mask_path).parent == root / s.cls / "Data" / "Masks" / "Anomaly"
             for s in idx.test if s.label)


def test_merged_downloads(tmp_path):
  mvtec = _mvtec_download(tmp_path / "mvtec_anomaly_detection",
                          {c: ("crack",) for c in MVTEC}, n_train=1)
  btad = _btad_download(tmp_path / "BTech_Dataset_transformed")
  visa = _visa_download(tmp_path / "VisA", VISA)
  idx = _index(f"mvtec_btad_visa.py:mvtec={mvtec},btad={btad},visa={visa}")
  assert idx.classes == MVTEC + BTAD + VISA and len(idx.classes) == 30
  train = collections.Counter(s.cls for s in idx.train)
  assert train == {**{c: 1 for c in MVTEC}, **{c: 3 for c in BTAD + VISA}}
  anomalous = collections.Counter(s.cls for s in idx.test if s.label)
  assert set(anomalous.values()) == {2} and len(anomalous) == 30
  _masks_pair_by_stem([s for s in idx.test if s.cls in MVTEC], "_mask")
  _masks_pair_by_stem([s for s in idx.test if s.cls not in MVTEC])
  with pytest.raises(ValueError, match=r"arguments \['btad'\].*--config.data.root"):
    _index(f"mvtec_btad_visa.py:layout=meta,btad={btad}")


def test_uniad_meta_files_stay_an_option(tmp_path):
  root = _mvtec_download(tmp_path / "mvtec_anomaly_detection", {"bottle": ("broken_large",)})
  train = [{"filename": f"bottle/train/good/{i:03d}.png", "label": 0, "label_name": "good",
            "clsname": "bottle"} for i in range(2)]
  test = [{"filename": "bottle/test/broken_large/001.png", "label": 1, "label_name": "defective",
           "maskname": "bottle/ground_truth/broken_large/001_mask.png", "clsname": "bottle"}]
  for name, rows in (("train.json", train), ("test.json", test)):
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
  idx = _index("mvtec.py:layout=meta", f"--config.data.root={root}",
               f"--config.data.meta_train={tmp_path / 'train.json'}",
               f"--config.data.meta_test={tmp_path / 'test.json'}")
  assert idx.classes == ("bottle",) and len(idx.train) == 2 and len(idx.test) == 1
  assert idx.test[0].mask_path.endswith("001_mask.png")
  with pytest.raises(ValueError, match=r"layout='visa_csv'.*'mvtec'.*'meta'"):
    _index("mvtec.py:layout=visa_csv")


# ------------------------------------------------------------------------------------------------
# ~ and $VAR in paths


@pytest.fixture
def home(tmp_path, monkeypatch):
  """A fake home directory, ONENIP_TEST_DATA and ONENIP_TEST_BUCKET set; ONENIP_TEST_UNSET unset."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("ONENIP_TEST_DATA", str(tmp_path / "data"))
  monkeypatch.setenv("ONENIP_TEST_BUCKET", "gs://bucket")
  monkeypatch.delenv("ONENIP_TEST_UNSET", raising=False)
  return tmp_path


def test_path_settings_expand_home_and_variables(home):
  _btad_download(home / "home" / "BTech_Dataset_transformed")
  cfg = loading.load_config(str(REPO / "configs" / "btad.py"), [
      "--config.data.root=~/BTech_Dataset_transformed",
      "--config.data.textures=$ONENIP_TEST_DATA/dtd",
      "--config.backbone.weights=${ONENIP_TEST_DATA}/b4.msgpack",
      "--config.data.meta_train=gs://bucket/$ONENIP_TEST_UNSET/train.json",
      "--config.data.meta_test=/data/price$/test.json"])
  assert cfg.data.root == str(home / "home" / "BTech_Dataset_transformed")
  assert cfg.data.textures == str(home / "data" / "dtd")
  assert cfg.backbone.weights == str(home / "data" / "b4.msgpack")
  assert cfg.data.meta_train == "gs://bucket/$ONENIP_TEST_UNSET/train.json"  # URLs untouched
  assert cfg.data.meta_test == "/data/price$/test.json"  # a `$` without a name stays
  assert indexing.index_dataset(cfg.data).classes == ("01", "02", "03")
  # The folders given as config arguments (data.extra) and the config file itself.
  shutil.copy(REPO / "configs" / "mvtec_btad_visa.py", home / "home" / "all.py")
  shutil.copy(REPO / "configs" / "mvtec.py", home / "home" / "mvtec.py")
  shutil.copy(REPO / "configs" / "btad.py", home / "home" / "btad.py")
  shutil.copy(REPO / "configs" / "visa.py", home / "home" / "visa.py")
  cfg = loading.load_config("~/all.py:btad=~/b,visa=$ONENIP_TEST_DATA/VisA")
  assert [e["root"] for e in cfg.data.extra] == [str(home / "home" / "b"),
                                                str(home / "data" / "VisA")]


def test_unset_variable_names_the_setting(home):
  with pytest.raises(loading.PathError,
                     match=r"^data\.root='\$ONENIP_TEST_UNSET/mvtec': environment variable "
                     r"ONENIP_TEST_UNSET is not set$"):
    loading.load_config(str(REPO / "configs" / "mvtec.py"),
                        ["--config.data.root=$ONENIP_TEST_UNSET/mvtec"])
  with pytest.raises(loading.PathError, match=r"data\.extra\[1\]\.root='\$\{ONENIP_TEST_UNSET\}"):
    loading.load_config(str(REPO / "configs" / "mvtec_btad_visa.py")
                        + ":visa=${ONENIP_TEST_UNSET}/VisA")


def test_cli_path_flags_expand(home, monkeypatch, capsys):
  got = []
  monkeypatch.setattr(predict, "main", got.append)
  cli.predict(["--exported=~/export", "--out=${ONENIP_TEST_DATA}/pred", "~/a.png",
               "$ONENIP_TEST_DATA/b.png", "gs://bucket/c.png"])
  a = got[0]
  assert (a.exported, a.out) == (str(home / "home" / "export"), str(home / "data" / "pred"))
  cli.predict(["--exported=$ONENIP_TEST_BUCKET/export", "x.png"])
  assert got[1].exported == "gs://bucket/export"  # a variable may hold a URL
  assert a.inputs == [str(home / "home" / "a.png"), str(home / "data" / "b.png"),
                      "gs://bucket/c.png"]
  for command, argv in ((cli.export, ["--workdir=$ONENIP_TEST_UNSET/run", "--out=~/x"]),
                        (cli.train, ["--config=configs/demo.py", "--workdir=$ONENIP_TEST_UNSET/run"])):
    with pytest.raises(SystemExit) as e:
      command(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"onenip-{command.__name__}: error: --workdir='$ONENIP_TEST_UNSET/run': environment "
        "variable ONENIP_TEST_UNSET is not set"]
