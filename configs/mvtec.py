r"""OneNIP on MVTec AD (15 classes, one unified model), the paper's main setting.

Reads the download as unpacked (mvtec_anomaly_detection.tar.xz from
https://www.mvtec.com/company/research/datasets/mvtec-ad): `data.root` is the folder holding
bottle/ ... zipper/, each with train/good, test/<defect> and ground_truth/<defect>/NNN_mask.png.

  onenip-train --config configs/mvtec.py:res=224,backbone=b4 --workdir runs/mvtec-224 \
      --config.data.root=~/data/mvtec_anomaly_detection --config.data.textures=~/data/dtd \
      --config.backbone.weights=~/weights/b4.msgpack

Arguments: res=224|256|320, backbone=b4|lite2|..., layout=mvtec|meta. A subset of the classes:
--config.data.classes="('bottle','screw')". layout=meta reads the UniAD json-lines meta files
instead, data/MVTec-AD/train.json and test.json of the UniAD repository
(https://github.com/zhiyuanyou/UniAD), image paths relative to the same `data.root`:

  onenip-train --config configs/mvtec.py:layout=meta --workdir runs/mvtec-meta \
      --config.data.root=~/data/mvtec_anomaly_detection --config.data.textures=~/data/dtd \
      --config.data.meta_train=~/UniAD/data/MVTec-AD/train.json \
      --config.data.meta_test=~/UniAD/data/MVTec-AD/test.json

Protocols: protocol=calibrated|paper|frozen_c (`base.PROTOCOLS`; paper: the published protocol,
comparable to the line below).

Reference (v2 log, 224): mean I-AUROC 97.96, I-AP 99.34, P-AUROC 97.91, P-AP 63.87.
"""
from onenip_jax.config import base

CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
           "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")


def get_config(arg=None):
  return base.dataset_config(arg, layout="mvtec", classes=CLASSES,
                             root="data/MVTec-AD/mvtec_anomaly_detection",
                             meta_dir="data/MVTec-AD")[0]
