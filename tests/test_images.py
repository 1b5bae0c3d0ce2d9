"""Input images: every odd file a user can upload, built here in code; output size and fitting."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageFile

from lcm import images, params
from lcm.errors import InputError
from lcm.params import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, so headers can claim sizes and depths Pillow will not write."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def save(tmp_path: Path, name: str, image: Image.Image, **options) -> Path:
    path = tmp_path / name
    image.save(path, **options)
    return path


def noise(width: int, height: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def refusal(path: Path) -> str:
    with pytest.raises(InputError) as caught:
        images.load_input_image(path)
    assert caught.value.field == "image"
    assert caught.value.value == path.name
    return str(caught.value)


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 6) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- refused files -------------------------------------------------------------------------------------


def test_empty_file_is_refused(tmp_path):
    message = refusal(write(tmp_path, "empty.png", b""))
    assert message == (
        "image='empty.png' is not allowed: a PNG, JPEG, WebP, GIF, BMP or TIFF image of at most "
        "50 megapixels and 50 MB; this file is empty"
    )


def test_text_file_is_refused(tmp_path):
    message = refusal(write(tmp_path, "notes.png", b"a shopping list, not a picture\n" * 10))
    assert message.endswith("; this file is not an image in one of those formats")


def test_other_image_formats_are_refused(tmp_path):
    message = refusal(save(tmp_path, "picture.ppm", noise(8, 8), format="PPM"))
    assert message.endswith("; this file is not an image in one of those formats")


def test_missing_file_is_refused(tmp_path):
    message = refusal(tmp_path / "gone.png")
    assert message.endswith("; this file cannot be read (No such file or directory)")


def _truncated_png(tmp_path: Path) -> Path:
    data = save(tmp_path, "whole.png", noise(64, 64), format="PNG").read_bytes()
    return write(tmp_path, "half.png", data[: len(data) // 2])


def _garbage_idat(tmp_path: Path) -> Path:
    good = png_bytes(4, 4, 8, 2, b"\x00" + b"\x80" * 12)
    start = good.index(b"IDAT") + 4
    return write(tmp_path, "garbage.png", good[:start] + b"\xde\xad\xbe\xef" * 3 + good[start + 12 :])


def _truncated_jpeg(tmp_path: Path) -> Path:
    data = save(tmp_path, "whole.jpg", noise(64, 64), format="JPEG").read_bytes()
    return write(tmp_path, "half.jpg", data[: len(data) // 2])


@pytest.mark.parametrize("make", [_truncated_png, _garbage_idat, _truncated_jpeg])
def test_broken_images_are_refused(tmp_path, make):
    message = refusal(make(tmp_path))
    assert message.endswith("; this file is damaged or cut short, or uses an encoding Pillow cannot read")


@pytest.mark.parametrize("error", [KeyError("tag"), struct.error("unpack"), IndexError(), SyntaxError("bad")])
def test_unexpected_pillow_errors_become_input_errors(tmp_path, monkeypatch, error):
    def broken(image):
        raise error

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken)
    path = save(tmp_path, "a.png", noise(8, 8), format="PNG")
    assert refusal(path).endswith(
        "; this file is damaged or cut short, or uses an encoding Pillow cannot read"
    )


def test_running_out_of_memory_is_not_blamed_on_the_file(tmp_path, monkeypatch):
    def exhausted(image):
        raise MemoryError

    monkeypatch.setattr(images.ImageOps, "exif_transpose", exhausted)
    with pytest.raises(MemoryError):
        images.load_input_image(save(tmp_path, "a.png", noise(8, 8), format="PNG"))


class _LoadSpy:
    """Records every pixel decode, to prove a refusal came from the header alone."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[tuple[int, int]] = []
        original = ImageFile.ImageFile.load

        def load(image: ImageFile.ImageFile):
            self.sizes.append(image.size)
            return original(image)

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_decompression_bomb_header_is_refused_without_decoding(tmp_path, monkeypatch):
    # A valid 20000x20000 RGB header with a few bytes of IDAT: 1.2 GB if it were decoded.
    path = write(tmp_path, "bomb.png", png_bytes(20_000, 20_000, 8, 2, b"\x00" * 100))
    assert path.stat().st_size < 200
    spy = _LoadSpy(monkeypatch)
    message = refusal(path)
    assert spy.sizes == []  # refused from the header: no pixel was decoded
    assert message == (
        "image='bomb.png' is not allowed: a PNG, JPEG, WebP, GIF, BMP or TIFF image of at most "
        "50 megapixels and 50 MB; this one has over 178 megapixels"
    )


@pytest.mark.parametrize(
    "width,height,shown",
    [(10_000, 5_001, "10000x5001 (50.0 megapixels)"), (10_000, 10_000, "10000x10000 (100.0 megapixels)")],
)
def test_headers_over_the_pixel_limit_are_refused_with_their_size(
    tmp_path, monkeypatch, width, height, shown
):
    # 100 MP sits in Pillow's warning band (89-179 MP): refused by our check, and no warning escapes.
    assert width * height > images.MAX_INPUT_PIXELS
    path = write(tmp_path, "big.png", png_bytes(width, height, 8, 2, b"\x00" * 100))
    spy = _LoadSpy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = refusal(path)
    assert spy.sizes == []
    assert message.endswith(f"; this one is {shown}")


def test_files_over_the_byte_limit_are_refused_before_reading(tmp_path):
    path = tmp_path / "huge.png"
    with path.open("wb") as f:  # sparse: no 50 MB written
        f.truncate(images.MAX_INPUT_BYTES + 1)
    assert refusal(path).endswith("; this file is 50.0 MB")


# --- accepted files ------------------------------------------------------------------------------------


def loaded(path: Path) -> Image.Image:
    image = images.load_input_image(path)
    assert image.mode == "RGB"
    return image


@pytest.mark.parametrize(
    "name,options",
    [
        ("a.png", {"format": "PNG"}),
        ("a.jpg", {"format": "JPEG", "quality": 95}),
        ("a.webp", {"format": "WEBP", "lossless": True}),
        ("a.gif", {"format": "GIF"}),
        ("a.bmp", {"format": "BMP"}),
        ("a.tif", {"format": "TIFF"}),
    ],
)
def test_each_accepted_format_loads_as_rgb(tmp_path, name, options):
    source = Image.new("RGB", (40, 30), RED)
    image = loaded(save(tmp_path, name, source, **options))
    assert image.size == (40, 30)
    assert close(image.getpixel((20, 15)), RED)


def test_loaded_image_is_independent_of_the_file(tmp_path):
    path = save(tmp_path, "a.png", Image.new("RGB", (8, 8), BLUE), format="PNG")
    image = images.load_input_image(path)
    path.unlink()
    assert image.getpixel((0, 0)) == BLUE


def test_one_pixel_png_loads_and_scales_up_to_the_minimum(tmp_path):
    image = loaded(save(tmp_path, "dot.png", Image.new("RGB", (1, 1), RED), format="PNG"))
    assert image.size == (1, 1)
    size = params.output_size(image.size, None, None)
    assert size == (256, 256)
    fitted = images.fit_image(image, *size)
    assert fitted.size == (256, 256)
    assert fitted.getpixel((128, 128)) == RED


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    # Pillow writes CMYK JPEGs inverted with an Adobe marker, as Photoshop does.
    source = Image.new("CMYK", (16, 16), (0, 255, 0, 0))  # pure magenta ink
    path = save(tmp_path, "cmyk.jpg", source, format="JPEG", quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    assert close(loaded(path).getpixel((8, 8)), (255, 0, 255))


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    row = b"\x00" + struct.pack(">4H", 0, 32768, 65535, 257)
    path = write(tmp_path, "gray16.png", png_bytes(4, 1, 16, 0, row))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    image = loaded(path)
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128,) * 3, (255,) * 3, (1,) * 3]


def test_thirty_two_bit_tiff_with_sixteen_bit_samples_is_scaled(tmp_path):
    source = Image.fromarray(np.array([[0, 32768, 65535]], np.int32))
    path = save(tmp_path, "gray32.tif", source, format="TIFF")
    with Image.open(path) as raw:
        assert raw.mode == "I"
    image = loaded(path)
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128,) * 3, (255,) * 3]


def test_sixteen_bit_rgb_png_is_scaled(tmp_path):
    row = b"\x00" + struct.pack(">6H", 32768, 65535, 0, 16384, 8192, 49152)
    image = loaded(write(tmp_path, "rgb16.png", png_bytes(2, 1, 16, 2, row)))
    assert close(image.getpixel((0, 0)), (128, 255, 0), 1)
    assert close(image.getpixel((1, 0)), (64, 32, 192), 1)


def test_transparent_pixels_become_white(tmp_path):
    pixels = np.zeros((2, 3, 4), np.uint8)
    pixels[:, 0] = (0, 0, 0, 0)  # transparent
    pixels[:, 1] = (0, 0, 0, 128)  # half-transparent black
    pixels[:, 2] = (255, 0, 0, 255)  # opaque red
    image = loaded(save(tmp_path, "rgba.png", Image.fromarray(pixels), format="PNG"))
    assert image.getpixel((0, 0)) == WHITE
    assert close(image.getpixel((1, 0)), (127, 127, 127), 1)
    assert image.getpixel((2, 0)) == RED


def test_grayscale_with_alpha_is_flattened(tmp_path):
    source = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), mode="LA")
    image = loaded(save(tmp_path, "la.png", source, format="PNG"))
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == (0, 0, 0)


def test_palette_png_with_transparency_is_flattened(tmp_path):
    source = Image.new("P", (2, 1))
    source.putpalette([0, 255, 0, *RED])
    source.putpixel((0, 0), 0)
    source.putpixel((1, 0), 1)
    path = save(tmp_path, "palette.png", source, format="PNG", transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    image = loaded(path)
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == RED


@pytest.mark.parametrize(
    "name,options",
    [
        ("anim.gif", {"format": "GIF"}),
        ("anim.png", {"format": "PNG"}),
        ("anim.webp", {"format": "WEBP", "lossless": True}),
    ],
)
def test_animated_images_give_their_first_frame(tmp_path, name, options):
    first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    path = save(tmp_path, name, first, save_all=True, append_images=[second], duration=100, **options)
    with Image.open(path) as raw:
        assert raw.n_frames == 2
    assert close(loaded(path).getpixel((8, 8)), RED)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # displayed rotated 90 degrees clockwise
    path = save(tmp_path, "rotated.jpg", stored, format="JPEG", quality=95, exif=exif)
    image = loaded(path)
    assert image.size == (20, 40)
    assert close(image.getpixel((10, 5)), RED, 10)  # the stored left edge is now the top
    assert close(image.getpixel((10, 35)), BLUE, 10)


def test_webp_loads(tmp_path):
    image = loaded(save(tmp_path, "photo.webp", noise(30, 20), format="WEBP", quality=80))
    assert image.size == (30, 20)


# --- output size and fitting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_size,width,height,expected",
    [
        ((640, 480), 512, 768, (512, 768)),  # both given: taken as they are
        ((1, 1), None, None, (256, 256)),
        ((640, 480), None, None, (640, 480)),  # fits already: not upscaled
        ((4000, 3000), None, None, (1024, 768)),
        ((3000, 4000), None, None, (768, 1024)),
        ((1024, 1024), None, None, (1024, 1024)),
        ((300, 200), None, None, (384, 256)),  # short side raised to 256
        ((500, 300), None, None, (504, 304)),  # nearest multiples of 8
        ((5000, 100), None, None, (1024, 256)),  # extreme ratio: clamped, fit_image crops
        ((100, 5000), None, None, (256, 1024)),
        ((4000, 3000), 512, None, (512, 384)),  # one given: the other follows the aspect ratio
        ((4000, 3000), None, 512, (680, 512)),
        ((5000, 100), 1024, None, (1024, 256)),
        ((100, 5000), 1024, None, (1024, 1024)),
        ((1, 1), None, 304, (304, 304)),
    ],
)
def test_output_size(image_size, width, height, expected):
    assert params.output_size(image_size, width, height) == expected


@pytest.mark.parametrize("image_size", [(1, 1), (7, 3), (255, 257), (999, 1001), (5000, 100), (100, 5000)])
@pytest.mark.parametrize("width,height", [(None, None), (256, None), (None, 1024), (None, 520)])
def test_output_size_is_always_a_valid_size(image_size, width, height):
    for side in params.output_size(image_size, width, height):
        assert MIN_SIZE <= side <= MAX_SIZE and side % SIZE_MULTIPLE == 0


@pytest.mark.parametrize(
    "source,target", [((1, 1), (256, 256)), ((5000, 100), (1024, 256)), ((300, 200), (512, 512))]
)
def test_fit_image_gives_exactly_the_requested_size(source, target):
    assert images.fit_image(noise(*source), *target).size == target


def test_fit_image_crops_rather_than_distorts():
    source = Image.new("RGB", (300, 100), RED)
    source.paste(BLUE, (100, 0, 200, 100))  # a blue square in the middle of a wide red strip
    fitted = images.fit_image(source, 256, 256)
    assert fitted.size == (256, 256)
    corners = [fitted.getpixel(xy) for xy in ((3, 3), (252, 3), (3, 252), (252, 252))]
    assert all(close(c, BLUE) for c in corners)
