r"""OneNIP on MVTec AD (15 classes, one unified model), the paper's main setting.

  onenip-train --config configs/mvtec.py:res=224,backbone=b4 --workdir runs/mvtec-224 \
      --config.data.root=/data/MVTec-AD/mvtec_anomaly_detection \
      --config.data.meta_train=/data/MVTec-AD/train.json --config.data.meta_test=/data/MVTec-AD/test.json \
      --config.data.textures=/data/dtd --config.backbone.weights=~/weights/b4.msgpack

Arguments: res=224|256|320, backbone=b4|lite2|..., layout=meta|mvtec (the UniAD json-lines meta
files, or the plain MVTec folders with layout=mvtec and no meta files), protocol=calibrated|paper|
frozen_c (`base_config.PROTOCOLS`; paper: the published protocol, comparable to the line below).
Reference (v2 log, 224): mean I-AUROC 97.96, I-AP 99.34, P-AUROC 97.91, P-AP 63.87.
"""
from onenip_jax import base_config


def get_config(arg=None):
  return base_config.dataset_config(arg, root="data/MVTec-AD/mvtec_anomaly_detection", meta_dir="data/MVTec-AD")[0]
