r"""OneNIP on VisA (12 classes, the 1cls split), one unified model.

Reads the download as unpacked (VisA_20220922.tar from
https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar, extracted into one
folder): `data.root` is the folder holding candle/ ... pipe_fryum/ and split_csv/1cls.csv
(`object,split,label,image,mask`, paths relative to that folder), read by default from
`<root>/split_csv/1cls.csv` (`data.visa_csv` names another).

  onenip-train --config configs/visa.py:res=224 --workdir runs/visa-224 \
      --config.data.root=~/data/VisA --config.data.textures=~/data/dtd \
      --config.backbone.weights=~/weights/b4.msgpack

Arguments: res=224|256|320, backbone=b4|lite2|..., layout=visa_csv|meta,
protocol=calibrated|paper|frozen_c (`base.PROTOCOLS`; paper: the published protocol,
comparable to the line below). layout=meta reads the
json-lines meta files data/visa/train.json and test.json of the OneNIP repository
(https://github.com/gaobb/OneNIP), paths relative to the same `data.root`: add
--config.data.meta_train=~/OneNIP/data/visa/train.json
--config.data.meta_test=~/OneNIP/data/visa/test.json. That train.json repeats some images
(docs/algorithm.md §2.1), the csv does not.
Reference (v2 log, 224): mean 92.84 / 94.81 / 98.71 / 42.51.
"""
from onenip_jax.config import base

CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
           "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")


def get_config(arg=None):
  return base.dataset_config(arg, layout="visa_csv", classes=CLASSES, root="data/VisA",
                             meta_dir="data/VisA")[0]
