r"""OneNIP on MVTec AD + BTAD + VisA merged (30 classes), one unified model (paper Tab. 2).

Reads the three downloads as unpacked (see configs/mvtec.py, btad.py and visa.py), their folders
given as the arguments mvtec, btad and visa:

  onenip-train --workdir runs/all-224 --config configs/mvtec_btad_visa.py:res=224,mvtec=~/data/mvtec_anomaly_detection,btad=~/data/BTech_Dataset_transformed,visa=~/data/VisA \
      --config.data.textures=~/data/dtd --config.backbone.weights=~/weights/b4.msgpack

MVTec AD is `data`, BTAD and VisA the two entries of `data.extra`; no class name is shared, so the
classes keep their names (MVTec's, then BTAD's, then VisA's). Arguments: res=224|256|320,
backbone=b4|lite2|..., mvtec=DIR, btad=DIR, visa=DIR (default: the folders of the three configs),
layout=download|meta. layout=meta reads the merged json-lines meta files
data/mvtec+btad+visa/train.json and test.json of the OneNIP repository
(https://github.com/gaobb/OneNIP), paths relative to one folder holding all 30 class folders:

  onenip-train --workdir runs/all-meta --config configs/mvtec_btad_visa.py:layout=meta \
      --config.data.root=~/data/mvtec+btad+visa --config.data.textures=~/data/dtd \
      --config.data.meta_train=~/OneNIP/data/mvtec+btad+visa/train.json \
      --config.data.meta_test=~/OneNIP/data/mvtec+btad+visa/test.json

Protocols: protocol=calibrated|paper|frozen_c (`base.PROTOCOLS`; paper: the published protocol,
comparable to the line below).

Reference (v2 log, 224): 30-class mean 94.61 / 96.93 / 98.03 / 53.47.
"""
import os

from onenip_jax.config import base, loading

_HERE = os.path.dirname(os.path.abspath(__file__))
_DATASETS = ("mvtec", "btad", "visa")
_EXTRA_KEYS = ("layout", "root", "classes", "meta_train", "meta_test", "visa_csv")


def _sibling(name: str, arg: str):
  """The config of the sibling file `<name>.py` (config files are loaded by path)."""
  return loading.load_python_file(os.path.join(_HERE, f"{name}.py")).get_config(arg)


def get_config(arg=None):
  a = base.parse_args(arg, res=224, backbone="b4", layout="download", protocol="calibrated",
                      **{name: "" for name in _DATASETS})
  common = f"res={a['res']},backbone={a['backbone']},protocol={a['protocol']}"
  if a["layout"] == "meta":
    given = [name for name in _DATASETS if a[name]]
    if given:
      raise ValueError(f"config arguments {given} are folders of the downloads; with layout=meta "
                       "pass the merged folder as --config.data.root")
    return base.dataset_config(common + ",layout=meta", layout="mvtec", classes=(),
                               root="data/mvtec+btad+visa",
                               meta_dir="data/mvtec+btad+visa")[0]
  if a["layout"] != "download":
    raise ValueError(f"config argument layout={a['layout']!r}: expected 'download' (the three "
                     "datasets as downloaded) or 'meta' (merged meta files)")
  c = _sibling("mvtec", common)
  parts = [c.data] + [_sibling(name, common).data for name in _DATASETS[1:]]
  for name, data in zip(_DATASETS, parts):
    if a[name]:
      data.root = a[name]
  c.data.extra = tuple({key: data[key] for key in _EXTRA_KEYS} for data in parts[1:])
  return c
