"""PIL decoding of any image file to uint8 (H, W, channels): numpy and Pillow only.

The one decoder for what TF's own decoders do not read (BMP, TIFF, 16-bit PNG, ...): the tf.data
pipeline calls it through `tf.numpy_function`, and the serialised predictor's consumer
(`onenip_jax.serving.program`), which has no TensorFlow, calls it for every image.

`MAX_PIXELS` is the one limit on an image's size (width x height): `onenip-predict` refuses a
larger image, and indexing one larger than `data.max_pixels` (default this). It is PIL's own
decompression-bomb limit (2 x 89,478,485 pixels), which PIL then no longer applies itself, so that
a raised `data.max_pixels` holds for every format.
"""
import io
from typing import Optional

import numpy as np
from PIL import Image

MAX_PIXELS = 178_956_970
Image.MAX_IMAGE_PIXELS = None  # the check is `check_pixels`, with the limit of the caller


def image_size(contents: bytes) -> tuple:
  """(width, height) of encoded image bytes, from the header alone (no pixel is decoded)."""
  with Image.open(io.BytesIO(contents)) as im:
    return im.size


def check_pixels(size: tuple, max_pixels: Optional[int],
                 setting: str = "data_pipelines.pil_decode.MAX_PIXELS") -> None:
  """ValueError when an image of `size` (width, height) has more than `max_pixels` pixels (None:
  no limit); the message names the `setting` that holds the limit."""
  w, h = size
  if max_pixels is not None and w * h > max_pixels:
    raise ValueError(f"image of {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                     f"pixels ({setting})")


def pil_decode(contents: bytes, channels: int = 3,
               max_pixels: Optional[int] = MAX_PIXELS) -> np.ndarray:
  """Encoded bytes -> uint8 (H, W, channels): grey replicated to RGB, alpha dropped, 16-bit >> 8.

  ValueError (`check_pixels`) before decoding an image of more than `max_pixels` pixels.
  """
  with Image.open(io.BytesIO(contents)) as im:
    check_pixels(im.size, max_pixels)
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
