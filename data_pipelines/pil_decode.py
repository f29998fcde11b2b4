"""PIL decoding of any image file to uint8 (H, W, channels): numpy and Pillow only.

The one decoder for what TF's own decoders do not read (BMP, TIFF, 16-bit PNG, ...): the tf.data
pipeline calls it through `tf.numpy_function`, and the serialised predictor's consumer
(`onenip_jax.exported`), which has no TensorFlow, calls it for every image.
"""
import io

import numpy as np
from PIL import Image


def pil_decode(contents: bytes, channels: int = 3) -> np.ndarray:
  """Encoded bytes -> uint8 (H, W, channels): grey replicated to RGB, alpha dropped, 16-bit >> 8."""
  with Image.open(io.BytesIO(contents)) as im:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
      a = np.asarray(im)
      if a.dtype.itemsize > 1 and (a.dtype.kind == "u" or a.max(initial=0) > 255):
        a = np.right_shift(a.astype(np.uint32), 8)
      a = np.clip(a, 0, 255).astype(np.uint8)
      if a.ndim == 3:  # multi-channel 16-bit
        a = a[..., :3]
    elif im.mode == "F":
      a = np.asarray(im, np.float32)
      a = np.clip(np.rint(a * 255.0 if a.max(initial=0.0) <= 1.0 else a), 0, 255).astype(np.uint8)
    else:
      a = np.asarray(im.convert("RGB" if channels == 3 else "L"))
  if a.ndim == 2:
    a = a[..., None]
  if channels == 3 and a.shape[-1] == 1:
    a = np.repeat(a, 3, axis=-1)
  elif channels == 1 and a.shape[-1] != 1:  # only for 16-bit colour: luma as PIL's "L"
    a = np.rint(a[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114]))
    a = a.astype(np.uint8)[..., None]
  return np.ascontiguousarray(a[..., :channels], np.uint8)
