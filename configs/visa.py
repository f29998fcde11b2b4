r"""OneNIP on VisA (12 classes, 1cls split), one unified model.

  onenip-train --config configs/visa.py:res=224 --workdir runs/visa-224 \
      --config.data.root=/data/VisA --config.data.meta_train=/data/VisA/train.json \
      --config.data.meta_test=/data/VisA/test.json --config.data.textures=/data/dtd \
      --config.backbone.weights=~/weights/b4.msgpack

Arguments: res=224|256|320, backbone=b4|lite2|..., layout=meta|visa_csv (VisA's split_csv/1cls.csv;
note the shipped train.json repeats some images, docs/algorithm.md §2.1, and the csv does not),
protocol=calibrated|paper|frozen_c (`base_config.PROTOCOLS`; paper: comparable to the line below).
Reference (v2 log, 224): mean 92.84 / 94.81 / 98.71 / 42.51.
"""
from onenip_jax import base_config


def get_config(arg=None):
  c, a = base_config.dataset_config(arg, root="data/VisA", meta_dir="data/VisA")
  if a["layout"] == "visa_csv":
    c.data.visa_csv = "data/VisA/split_csv/1cls.csv"
  return c
