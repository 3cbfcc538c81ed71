"""The shared preprocessing path: every accepted format, every refusal."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from model.config import get_preset
from model.preprocess import (
    DecodeLimits, ImageRejected, Normalizer, decode_image, decode_pixels, load_image, load_pixels, resize_and_crop,
)
from testkit.images import encode, png_header_only


def gradient(width=40, height=30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_each_format_decodes_to_rgb_uint8(fmt):
    pixels = decode_image(encode(gradient(), fmt))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 30, 40)
    if fmt in ("PNG", "BMP"):  # lossless: exact pixels
        assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(np.array(gradient())))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "1"])
def test_color_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    pixels = decode_image(encode(gradient().convert(mode), fmt))
    assert pixels.shape == (3, 30, 40)


def test_cmyk_jpeg_keeps_its_colours():
    red = Image.new("RGB", (16, 16), (220, 20, 20)).convert("CMYK")
    pixels = decode_image(encode(red, "JPEG", quality=95)).float().mean(dim=(1, 2))
    assert pixels[0] > 150 and pixels[1] < 80 and pixels[2] < 80


def test_16_bit_png_keeps_its_range():
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16)[None, :].repeat(8, 0)
    pixels = decode_image(encode(Image.fromarray(ramp), "PNG"))
    assert pixels.dtype == torch.uint8
    assert pixels[0, 0, 0] == 0 and pixels[0, 0, -1] == 255


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    pixels = decode_image(data)
    assert pixels[0].float().mean() > 200 and pixels[2].float().mean() < 50


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
    image = gradient(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    pixels = decode_image(encode(image, fmt, exif=exif.tobytes()))
    assert pixels.shape == (3, 40, 30)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(orientation):
    """JPEGs decode through libjpeg-turbo directly (simplejpeg); their EXIF orientation is applied
    as Pillow's exif_transpose does, pixel for pixel."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(gradient(40, 24), "JPEG", quality=100, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB")))
    np.testing.assert_array_equal(decode_pixels(data), expected)


def test_large_jpegs_decode_at_a_reduced_scale_for_small_models():
    """libjpeg-turbo's DCT scaling: a JPEG decodes at the smallest of 1/8, 2/8, ... 8/8 that keeps the
    shorter side at least resize_size: a 1280x960 JPEG at 1/8 (160x120) for the 64-pixel model."""
    data = encode(gradient(1280, 960), "JPEG", quality=90)
    assert decode_pixels(data, min_side=64).shape == (120, 160, 3)
    assert decode_pixels(data, min_side=256).shape == (360, 480, 3)  # 3/8: 2/8 would leave 240 < 256
    assert decode_pixels(data).shape == (960, 1280, 3)
    prep = get_preset("small").preprocessing
    full = resize_and_crop(decode_image(data), prep).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(load_pixels(data, prep).astype(int) - full).mean() < 2  # the same picture


def test_rgba_alpha_is_dropped_not_blended():
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    assert decode_image(encode(rgba, "PNG"))[:, 0, 0].tolist() == [10, 200, 30]


def test_resize_and_crop_takes_center_square():
    prep = get_preset("alexnet").preprocessing
    out = resize_and_crop(decode_image(encode(gradient(400, 300), "PNG")), prep)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8


def test_load_image_one_pixel_image_works():
    out = load_image(encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), get_preset("small").preprocessing)
    assert out.shape == (3, 64, 64)
    assert out[0].min() == 255 and out[1].max() == 0


def test_normalizer_matches_formula():
    prep = get_preset("alexnet").preprocessing
    batch = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    out = Normalizer(prep)(batch)
    expected = (128 / 255 - torch.tensor(prep.mean)) / torch.tensor(prep.std)
    torch.testing.assert_close(out[0, :, 0, 0], expected)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, this is not an image at all", "not_an_image"),
        (b"%PDF-1.4\n%...", "not_an_image"),
        (png_header_only(30000, 30000), "too_many_pixels"),
    ],
)
def test_refusals_carry_a_reason(data, reason):
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    assert info.value.reason == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_truncated_files_are_refused(fmt):
    data = encode(Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)), fmt)
    with pytest.raises(ImageRejected) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.reason in {"corrupt", "not_an_image"}


def test_png_with_bad_crc_is_refused():
    data = bytearray(encode(gradient(), "PNG"))
    data[-20] ^= 0xFF  # inside the last IDAT chunk's data: CRC no longer matches
    with pytest.raises(ImageRejected):
        decode_image(bytes(data))


def test_zero_size_image_is_refused():
    with pytest.raises(ImageRejected) as info:
        decode_image(png_header_only(0, 10))
    assert info.value.reason in {"zero_size", "corrupt"}


def test_byte_limit():
    data = encode(gradient(), "PNG")
    with pytest.raises(ImageRejected) as info:
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))
    assert info.value.reason == "too_many_bytes"


def test_pixel_limit_is_configurable():
    data = encode(gradient(40, 30), "PNG")
    decode_image(data, DecodeLimits(max_pixels=1200))
    with pytest.raises(ImageRejected, match="1,199"):
        decode_image(data, DecodeLimits(max_pixels=1199))


def test_large_photo_within_limit_works():
    photo = Image.new("RGB", (4000, 3000), (30, 60, 90))
    out = load_image(encode(photo, "JPEG"), get_preset("alexnet").preprocessing)
    assert out.shape == (3, 224, 224)
