r"""OneNIP on BTAD (classes 01, 02, 03), one unified model.

  onenip-train --config configs/btad.py:res=224 --workdir runs/btad-224 \
      --config.data.root=/data/BTAD --config.data.meta_train=/data/BTAD/train.json \
      --config.data.meta_test=/data/BTAD/test.json --config.data.textures=/data/dtd \
      --config.backbone.weights=~/weights/b4.msgpack

Arguments: res=224|256|320, backbone=b4|lite2|..., layout=meta|mvtec (BTAD's own ok/ko folders),
protocol=calibrated|paper|frozen_c (`base_config.PROTOCOLS`; paper: comparable to the line below).
Reference (v2 log, 224): mean 93.17 / 98.53 / 97.42 / 56.33.
"""
from onenip_jax import base_config


def get_config(arg=None):
  return base_config.dataset_config(arg, root="data/BTAD/BTech_Dataset_transformed", meta_dir="data/BTAD")[0]
