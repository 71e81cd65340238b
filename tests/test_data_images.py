"""Image decoding and preprocessing against transformers' CLIPImageProcessor."""

import io
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from sqllava_jax.data import images
from sqllava_jax.data.errors import BadRecord

MAX_PIXELS = 50_000_000


def _photos():
  coffee = skimage.data.coffee()
  rocket = skimage.data.rocket()
  return {
      "astronaut-square": skimage.data.astronaut(),
      "coffee-landscape": coffee,
      "coffee-portrait": np.ascontiguousarray(coffee.transpose(1, 0, 2)),
      "chelsea-odd": skimage.data.chelsea(),
      "rocket-wide-strip": rocket[150:250],
      "rocket-tall-strip": np.ascontiguousarray(rocket[:, 300:420]),
      "camera-gray": skimage.data.camera(),
  }


def _encode(array_or_image, fmt="PNG", **kw) -> bytes:
  img = array_or_image
  if not isinstance(img, Image.Image):
    img = Image.fromarray(img)
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


@pytest.fixture(scope="module")
def processors():
  from transformers import CLIPImageProcessorPil  # pylint: disable=g-import-not-at-top
  return {size: CLIPImageProcessorPil(size={"shortest_edge": size},
                                      crop_size={"height": size, "width": size})
          for size in (336, 224)}


def _reference(data: bytes, processor, aspect_ratio: str) -> np.ndarray:
  """llava's loader: PIL decode, convert('RGB'), pad to a square of the mean colour, CLIP."""
  img = Image.open(io.BytesIO(data)).convert("RGB")
  if aspect_ratio == "pad":
    color = tuple(int(x * 255) for x in processor.image_mean)
    w, h = img.size
    side = max(w, h)
    square = Image.new(img.mode, (side, side), color)
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    img = square
  out = processor(img, return_tensors="np")["pixel_values"][0]
  return out.transpose(1, 2, 0)


@pytest.mark.parametrize("name", list(_photos()))
@pytest.mark.parametrize("aspect_ratio", ["pad", "square"])
@pytest.mark.parametrize("size", [336, 224])
def test_matches_clip_image_processor(processors, name, aspect_ratio, size):
  data = _encode(_photos()[name], "JPEG", quality=90)
  pixels = images.load_pixels(data, size=size, aspect_ratio=aspect_ratio, max_pixels=MAX_PIXELS)
  assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
  ours = images.normalize(pixels)
  ref = _reference(data, processors[size], aspect_ratio)
  assert ours.shape == ref.shape
  # In 8-bit pixel units. The goal is 1 (1/255 of the range); both resize the same 8-bit
  # image with PIL, so only float rounding (~1e-5) separates them.
  diff = np.abs(ours - ref) * np.asarray(images.CLIP_STD) * 255.0
  assert diff.max() < 1e-2, (name, float(diff.max()))


def test_band_resize_equals_resizing_the_whole_square():
  rng = np.random.default_rng(0)
  photo = skimage.data.astronaut()
  for _ in range(40):
    h, w = (int(x) for x in rng.integers(8, 400, size=2))
    y, x = int(rng.integers(0, 512 - h)), int(rng.integers(0, 512 - w))
    img = Image.fromarray(np.ascontiguousarray(photo[y:y + h, x:x + w]))
    for size in (336, 28):  # shrinking and enlarging
      whole = images.resize_and_crop(images.expand_to_square(img), size)
      np.testing.assert_array_equal(np.asarray(images.pad_and_resize(img, size)),
                                    np.asarray(whole), err_msg=f"{img.size} -> {size}")


def test_pad_colour_and_centering():
  img = Image.new("RGB", (40, 20), (255, 0, 0))
  square = images.expand_to_square(img)
  arr = np.asarray(square)
  assert square.size == (40, 40)
  assert tuple(arr[0, 0]) == images.PAD_COLOR == (122, 116, 104)
  assert tuple(arr[10, 0]) == (255, 0, 0) and tuple(arr[29, 39]) == (255, 0, 0)
  assert tuple(arr[30, 0]) == images.PAD_COLOR


def test_normalized_values():
  white = np.full((2, 2, 3), 255, np.uint8)
  expected = (1.0 - np.asarray(images.CLIP_MEAN)) / np.asarray(images.CLIP_STD)
  np.testing.assert_allclose(images.normalize(white)[0, 0], expected, rtol=1e-6)


def _rgb_of(data, size=8):
  return images.load_pixels(data, size=size, aspect_ratio="square", max_pixels=MAX_PIXELS)


def test_decodes_formats_and_modes():
  red = Image.new("RGB", (16, 16), (200, 30, 30))
  for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
    out = _rgb_of(_encode(red, fmt))
    assert out.shape == (8, 8, 3), fmt
    assert abs(int(out[4, 4, 0]) - 200) < 12 and out[4, 4, 1] < 60, (fmt, out[4, 4])
  gray = _rgb_of(_encode(Image.new("L", (16, 16), 90)))
  assert (gray == 90).all()
  palette = Image.new("RGB", (16, 16), (0, 0, 255)).convert("P")
  assert tuple(_rgb_of(_encode(palette))[4, 4]) == (0, 0, 255)
  rgba = Image.new("RGBA", (16, 16), (10, 200, 10, 40))
  assert tuple(_rgb_of(_encode(rgba))[4, 4]) == (10, 200, 10)
  cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
  out = _rgb_of(_encode(cmyk, "JPEG"))
  assert out[4, 4, 0] > 200 and out[4, 4, 1] < 60


def test_sixteen_bit_is_scaled_not_clipped():
  arr = np.full((16, 16), 32768, np.uint16)
  data = _encode(Image.fromarray(arr))
  assert Image.open(io.BytesIO(data)).mode.startswith("I")
  out = _rgb_of(data)
  assert abs(int(out[4, 4, 0]) - 128) <= 1, out[4, 4]


def test_gif_first_frame():
  frames = [Image.new("RGB", (16, 16), c) for c in ((0, 200, 0), (200, 0, 0))]
  buf = io.BytesIO()
  frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
  out = _rgb_of(buf.getvalue())
  assert out[4, 4, 1] > 150 and out[4, 4, 0] < 50


def test_bad_bytes_are_named():
  good = _encode(skimage.data.chelsea(), "JPEG")
  for data, reason in ((b"", "empty_image_file"), (b"not an image at all", "corrupt_image"),
                       (good[:len(good) // 3], "corrupt_image")):
    with pytest.raises(BadRecord) as e:
      images.decode_image(data, max_pixels=MAX_PIXELS, name="x.jpg")
    assert e.value.reason == reason
    assert "x.jpg" in str(e.value)


def test_pixel_limit_is_checked_before_decoding():
  big = _encode(Image.new("RGB", (300, 200)), "PNG")
  truncated = big[:100]  # a valid header, no pixel data: decoding would fail
  with pytest.raises(BadRecord) as e:
    images.decode_image(truncated, max_pixels=300 * 200 - 1, name="big.png")
  assert e.value.reason == "image_too_large" and "300x200" in str(e.value)
  assert images.decode_image(big, max_pixels=300 * 200).size == (300, 200)


def test_image_paths_stay_inside_the_folder(tmp_path):
  folder = tmp_path / "images"
  (folder / "coco").mkdir(parents=True)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  (outside / "a.png").write_bytes(b"x")
  os.symlink(outside, folder / "linked")
  assert images.resolve_image_path(str(folder), "coco/../coco/a.png") == str(folder / "coco/a.png")
  assert images.resolve_image_path(str(folder), "linked/a.png") == str(folder / "linked/a.png")
  for bad in ("../secret.png", "coco/../../secret.png", "/etc/passwd", ".."):
    with pytest.raises(BadRecord) as e:
      images.resolve_image_path(str(folder), bad)
    assert e.value.reason == "unsafe_image_path", bad


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(BadRecord) as e:
    images.read_image_file(str(tmp_path / "nope.png"), name="nope.png")
  assert e.value.reason == "missing_image" and e.value.image_file.endswith("nope.png")
  (tmp_path / "zero.png").write_bytes(b"")
  with pytest.raises(BadRecord) as e:
    images.read_image_file(str(tmp_path / "zero.png"), name="zero.png")
  assert e.value.reason == "empty_image_file"
