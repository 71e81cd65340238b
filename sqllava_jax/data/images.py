"""Image decoding and CLIP preprocessing, matching transformers' `CLIPImageProcessor`.

`pad` mode (LLaVA-1.5 stage 2): pad to a centred square with the CLIP mean colour, then the
CLIP processor: bicubic resize of the short side to `size`, centre crop, scale to [0, 1],
normalise with the CLIP mean and std. `square` mode (stage 1) skips the padding. Resizing
runs in PIL on 8-bit pixels, as the processor does, so results agree to one level at most
(see `pad_and_resize`); normalisation is deferred to `normalize_into`, which the batcher
runs once per batch.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from typing import Literal

import numpy as np
from PIL import Image

from sqllava_jax.data.errors import BadRecord

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# llava pads with int(255 * mean) per channel: (122, 116, 104).
PAD_COLOR = tuple(int(255 * m) for m in CLIP_MEAN)
AspectRatio = Literal["pad", "square"]


def resolve_image_path(folder: str, relative: str) -> str:
  """`folder/relative`, refusing absolute paths and `..` that leave `folder`.

  The check is lexical: symbolic links inside the folder (a common way to assemble an image
  tree) are followed, not refused.
  """
  if os.path.isabs(relative):
    raise BadRecord("unsafe_image_path", f"image path {relative!r} is absolute")
  norm = os.path.normpath(relative)
  if norm == ".." or norm.startswith(".." + os.sep):
    raise BadRecord("unsafe_image_path", f"image path {relative!r} leaves the image folder")
  return os.path.join(folder, norm)


def read_image_file(path: str, *, name: str) -> bytes:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise BadRecord("missing_image", f"image {name!r} not found", image_file=path) from None
  except IsADirectoryError:
    raise BadRecord("missing_image", f"image {name!r} is a directory", image_file=path) from None
  except OSError as e:
    raise BadRecord("missing_image", f"image {name!r} cannot be read: {e}",
                    image_file=path) from None
  if not data:
    raise BadRecord("empty_image_file", f"image {name!r} has zero bytes", image_file=path)
  return data


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> Image.Image:
  """RGB image from encoded bytes (JPEG, PNG, WebP, GIF's first frame, ...).

  Grayscale, palette, RGBA (alpha dropped, as `convert('RGB')` in the reference), CMYK and
  16-bit images come back as 8-bit RGB. Images over `max_pixels` are refused from their
  header, before any pixel is decoded.
  """
  if not data:
    raise BadRecord("empty_image_file", f"image {name!r} has zero bytes")
  try:
    with warnings.catch_warnings():
      # Our own pixel limit applies; PIL's bomb warning would only repeat it.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      width, height = img.size
      if width * height > max_pixels:
        raise BadRecord("image_too_large",
                        f"image {name!r} is {width}x{height} = {width * height} pixels, over "
                        f"data.max_image_pixels={max_pixels}")
      img.load()
      return _to_rgb(img)
  except BadRecord:
    raise
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise BadRecord("corrupt_image", f"image {name!r} cannot be decoded: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode == "RGB":
    return img
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    # PIL's own conversion clips 16-bit values at 255; scale them down instead.
    arr = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  if img.mode == "F":
    arr = np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  return img.convert("RGB")


def expand_to_square(img: Image.Image, color=PAD_COLOR) -> Image.Image:
  """Centre `img` on a square canvas of `color` (llava `expand2square`)."""
  width, height = img.size
  if width == height:
    return img
  side = max(width, height)
  canvas = Image.new(img.mode, (side, side), color)
  canvas.paste(img, ((side - width) // 2, (side - height) // 2))
  return canvas


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
  """Bicubic resize of the short side to `size`, then the centred `size` x `size` crop."""
  width, height = img.size
  if width <= height:
    new = (size, int(size * height / width))
  else:
    new = (int(size * width / height), size)
  if new != (width, height):
    img = img.resize(new, Image.Resampling.BICUBIC)
  width, height = img.size
  left, top = (width - size) // 2, (height - size) // 2
  if (left, top, width, height) != (0, 0, size, size):
    img = img.crop((left, top, left + size, top + size))
  return img


# PIL's bicubic kernel reaches two pixels either side (scaled up when shrinking).
_BICUBIC_SUPPORT = 2.0


def pad_and_resize(img: Image.Image, size: int, color=PAD_COLOR) -> Image.Image:
  """`resize_and_crop(expand_to_square(img), size)` without resampling pure padding.

  An output row (or column, for portrait images) whose bicubic kernel sees only padding
  is the pad colour exactly, so only the band whose kernels reach the photo is resampled,
  through PIL's `box`. The band starts and ends on output rows whose source position is a
  binary fraction: PIL reads the box as float32, and only then are the band's kernel
  weights those of the whole square, so the result is the same, pixel for pixel.
  """
  width, height = img.size
  side, short = max(width, height), min(width, height)
  if width == height or side == size:
    return resize_and_crop(expand_to_square(img, color), size)
  scale = side / size
  support = _BICUBIC_SUPPORT * max(scale, 1.0)
  offset = (side - short) // 2
  # Output rows that are multiples of `step` sit at binary-fraction source positions.
  step = size // math.gcd(size, side)
  step //= step & -step
  first = max(0, math.floor((offset - support) / scale - 0.5)) // step * step
  last = min(size, -(-(math.ceil((offset + short + support) / scale - 0.5) + 1) // step) * step)
  lo = max(0, math.floor((first + 0.5) * scale - support) - 1)
  hi = min(side, math.ceil((last - 0.5) * scale + support) + 1)
  landscape = width > height
  source = Image.new(img.mode, (side, hi - lo) if landscape else (hi - lo, side), color)
  source.paste(img, (0, offset - lo) if landscape else (offset - lo, 0))
  start, stop = first * side / size - lo, last * side / size - lo
  box = (0, start, side, stop) if landscape else (start, 0, stop, side)
  band = source.resize((size, last - first) if landscape else (last - first, size),
                       Image.Resampling.BICUBIC, box=box)
  out = Image.new(img.mode, (size, size), color)
  out.paste(band, (0, first) if landscape else (first, 0))
  return out


def preprocess_image(img: Image.Image, *, size: int,
                     aspect_ratio: AspectRatio = "pad") -> np.ndarray:
  """uint8[size, size, 3]: the processed image before normalisation."""
  if aspect_ratio == "pad":
    return np.asarray(pad_and_resize(img, size))
  return np.asarray(resize_and_crop(img, size))


def load_pixels(data: bytes, *, size: int, aspect_ratio: AspectRatio, max_pixels: int,
                name: str = "image") -> np.ndarray:
  """uint8[size, size, 3] from encoded image bytes."""
  return preprocess_image(decode_image(data, max_pixels=max_pixels, name=name), size=size,
                          aspect_ratio=aspect_ratio)


# float32[3, 256]: the normalised value of each 8-bit level per channel. A table lookup
# writes the float32 output in one pass, a little faster than multiply-add.
_LUT = np.stack([(np.arange(256) / 255.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
                ).astype(np.float32)


def normalize_into(pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
  """out[..., H, W, 3] = (pixels / 255 - CLIP_MEAN) / CLIP_STD, written in place."""
  for c in range(3):
    np.take(_LUT[c], pixels[..., c], out=out[..., c])
  return out


def normalize(pixels: np.ndarray) -> np.ndarray:
  """float32 CLIP-normalised copy of uint8 `pixels` [..., H, W, 3]."""
  return normalize_into(pixels, np.empty(pixels.shape, np.float32))
