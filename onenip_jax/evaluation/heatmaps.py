"""Anomaly heat-map pictures with PIL (no GUI, no matplotlib).

`save_heatmap` writes one PNG laid out as

  +---------+-----+---------------------------+
  |  image  | gap | overlay (+ GT contour)    |   H rows
  +---------+-----+---------------------------+
  | text band: title and score                |   TEXT_BAND rows
  +-------------------------------------------+

so its size is (2 * W + GAP, H + TEXT_BAND) (width, height). All files are written atomically.
"""
from __future__ import annotations

import io
import os
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from data_pipelines import storage

PathLike = Union[str, os.PathLike]

GAP = 4              # pixels between the image and the overlay
TEXT_BAND = 20       # rows under the pictures for the title and score
CONTOUR_COLOR = (255, 255, 255)   # white: never produced by the jet blend, so always visible
BACKGROUND = (0, 0, 0)
TEXT_COLOR = (255, 255, 255)


def jet(values: np.ndarray) -> np.ndarray:
  """Jet-like colormap (dark blue -> cyan -> yellow -> dark red).

  Args:
    values: (...) floats in [0, 1] (clipped).
  Returns:
    (..., 3) float32 RGB in [0, 1].
  """
  x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
  centers = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # r, g, b peaks at x = 3/4, 1/2, 1/4
  return np.clip(1.5 - np.abs(4.0 * x - centers), 0.0, 1.0)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1) or (H, W, 3) uint8 -> (H, W, 3) uint8."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f"image must be uint8, got {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def overlay(image_uint8: np.ndarray, anomaly_map: np.ndarray, *, vmin: float,
            vmax: float) -> np.ndarray:
  """Blends the jet-coloured anomaly map 50/50 with the image.

  Args:
    image_uint8: (H, W, 3) (or (H, W) grey) uint8 image.
    anomaly_map: (H, W) scores; mapped linearly from [vmin, vmax] to [0, 1] and clipped. Use the
      same vmin/vmax for every image of a run so colours are comparable.
    vmin, vmax: colour range (vmax == vmin paints everything at the low end).
  Returns:
    (H, W, 3) uint8.
  """
  image = _as_rgb_uint8(image_uint8)
  anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
  if anomaly_map.shape != image.shape[:2]:
    raise ValueError(f"anomaly_map {anomaly_map.shape} does not match image {image.shape[:2]}")
  if vmax < vmin:
    raise ValueError(f"vmax {vmax} < vmin {vmin}")
  scale = 1.0 / (vmax - vmin) if vmax > vmin else 0.0
  colours = jet((anomaly_map - vmin) * scale) * 255.0
  blended = 0.5 * image.astype(np.float32) + 0.5 * colours
  return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def mask_contour(mask: np.ndarray) -> np.ndarray:
  """Boundary pixels of a mask: mask pixels with a non-mask 4-neighbour (or on the image edge).

  Args:
    mask: (H, W), > 0 = foreground.
  Returns:
    (H, W) bool.
  """
  mask = np.asarray(mask) > 0
  if mask.ndim != 2:
    raise ValueError(f"mask must be (H, W), got {mask.shape}")
  return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _png_bytes(picture: Image.Image) -> bytes:
  buf = io.BytesIO()
  picture.save(buf, format="PNG")
  return buf.getvalue()


def save_heatmap(path: PathLike, image: np.ndarray, anomaly_map: np.ndarray,
                 mask: Optional[np.ndarray] = None, score: Optional[float] = None, *,
                 vmin: float, vmax: float, title: Optional[str] = None) -> str:
  """Writes a PNG: image | overlay (with the GT contour in white), title and score below.

  Args:
    path: destination .png (parent folders are created).
    image: (H, W, 3) uint8 image at the map's resolution.
    anomaly_map: (H, W) anomaly scores.
    mask: optional (H, W) GT mask (> 0 = anomalous); its contour is drawn on the overlay.
    score: optional image score, printed as 'score=...'.
    vmin, vmax: colour range of the map (see `overlay`).
    title: optional text printed before the score.
  Returns:
    The written path. Size: (2 * W + GAP, H + TEXT_BAND).
  """
  path = os.fspath(path)
  rgb = _as_rgb_uint8(image)
  blended = overlay(rgb, anomaly_map, vmin=vmin, vmax=vmax)
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
      raise ValueError(f"mask {mask.shape} does not match image {rgb.shape[:2]}")
    blended[mask_contour(mask)] = CONTOUR_COLOR
  h, w = rgb.shape[:2]
  canvas = Image.new("RGB", (2 * w + GAP, h + TEXT_BAND), BACKGROUND)
  canvas.paste(Image.fromarray(rgb), (0, 0))
  canvas.paste(Image.fromarray(blended), (w + GAP, 0))
  parts = [] if title is None else [str(title)]
  if score is not None:
    parts.append(f"score={float(score):.4f}")
  if parts:
    ImageDraw.Draw(canvas).text((2, h + 3), "  ".join(parts), fill=TEXT_COLOR,
                                font=ImageFont.load_default())
  storage.atomic_write(path, _png_bytes(canvas))
  return path


def contact_sheet(png_paths: Sequence[PathLike], out_path: PathLike, cols: int = 4) -> str:
  """Tiles PNGs into one grid picture (a per-class quick look).

  Every tile takes the size of the first picture (others are resized to it); rows are filled
  left to right, the last row padded with black.

  Args:
    png_paths: the pictures, in order (at least one).
    out_path: destination .png (parent folders are created).
    cols: tiles per row.
  Returns:
    The written path. Size: (min(cols, n) * W, ceil(n / cols) * H) of the first picture.
  """
  paths = [os.fspath(p) for p in png_paths]
  if not paths:
    raise ValueError("contact_sheet: no pictures given")
  if cols < 1:
    raise ValueError(f"cols must be >= 1, got {cols}")
  tiles = []
  for p in paths:
    with Image.open(io.BytesIO(storage.read_bytes(p))) as im:
      tiles.append(im.convert("RGB"))
  w, h = tiles[0].size
  n_cols = min(cols, len(tiles))
  n_rows = -(-len(tiles) // cols)
  sheet = Image.new("RGB", (n_cols * w, n_rows * h), BACKGROUND)
  for i, tile in enumerate(tiles):
    if tile.size != (w, h):
      tile = tile.resize((w, h), Image.Resampling.BILINEAR)
    sheet.paste(tile, ((i % cols) * w, (i // cols) * h))
  out_path = os.fspath(out_path)
  storage.atomic_write(out_path, _png_bytes(sheet))
  return out_path
