r"""OneNIP on MVTec + BTAD + VisA merged (30 classes), one unified model (paper Tab. 2).

  onenip-train --config configs/mvtec_btad_visa.py:res=224 --workdir runs/all-224 \
      --config.data.root=/data/mvtec+btad+visa --config.data.textures=/data/dtd \
      --config.backbone.weights=~/weights/b4.msgpack

Uses the merged meta files `<root>/train.json` and `<root>/test.json` (all class folders under one
image_dir). Arguments: res=224|256|320, backbone=b4|lite2|..., protocol=calibrated|paper|frozen_c
(`base_config.PROTOCOLS`; paper: comparable to the line below).
Reference (v2 log, 224): 30-class mean 94.61 / 96.93 / 98.03 / 53.47.
"""
from onenip_jax import base_config


def get_config(arg=None):
  return base_config.dataset_config(arg, root="data/mvtec+btad+visa", meta_dir="data/mvtec+btad+visa")[0]
