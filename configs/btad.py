r"""OneNIP on BTAD (classes 01, 02, 03), one unified model.

Reads the download as unpacked (btad.zip from https://avires.dimi.uniud.it/papers/btad/btad.zip):
`data.root` is BTech_Dataset_transformed/, holding 01/ 02/ 03/, each with train/ok, test/ok,
test/ko and ground_truth/ko (normal images in `ok`; a mask has its image's name, the extension may
differ: data_pipelines/layouts.py).

  onenip-train --config configs/btad.py:res=224 --workdir runs/btad-224 \
      --config.data.root=~/data/BTech_Dataset_transformed --config.data.textures=~/data/dtd \
      --config.backbone.weights=~/weights/b4.msgpack

Arguments: res=224|256|320, backbone=b4|lite2|..., layout=mvtec|meta,
protocol=calibrated|paper|frozen_c (`base.PROTOCOLS`; paper: the published protocol,
comparable to the line below). layout=meta reads the
json-lines meta files data/btad/train.json and test.json of the OneNIP repository
(https://github.com/gaobb/OneNIP, made like UniAD's), paths relative to the same `data.root`:
add --config.data.meta_train=~/OneNIP/data/btad/train.json
--config.data.meta_test=~/OneNIP/data/btad/test.json.
Reference (v2 log, 224): mean 93.17 / 98.53 / 97.42 / 56.33.
"""
from onenip_jax.config import base

CLASSES = ("01", "02", "03")


def get_config(arg=None):
  return base.dataset_config(arg, layout="mvtec", classes=CLASSES,
                             root="data/BTAD/BTech_Dataset_transformed",
                             meta_dir="data/BTAD")[0]
