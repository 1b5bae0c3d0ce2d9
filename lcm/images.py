"""Images in (uploaded files -> RGB at the output size) and out (latents -> pixels -> files)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image, ImageOps

from lcm.errors import InputError
from lcm.metadata import save_options

# The largest common camera output (48-50 MP phone sensors at full resolution, 8160x6120 = 49.9 MP)
# fits; decoded that is 150 MB as RGB, 200 MB as RGBA, and the output is at most 1 MP, so larger
# inputs would only cost memory and time. Pillow's own bomb warning starts at 89 MP.
MAX_INPUT_PIXELS = 50_000_000
# A 50 MP JPEG is 10-25 MB; the limit bounds reading and hashing an upload to well under a second.
MAX_INPUT_BYTES = 50_000_000
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow names; JPEG includes MPO
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ACCEPTED = (
    f"a PNG, JPEG, WebP, GIF, BMP or TIFF image of at most {MAX_INPUT_PIXELS // 1_000_000} megapixels "
    f"and {MAX_INPUT_BYTES // 1_000_000} MB"
)

EXTENSIONS = {"png": ".png", "webp": ".webp", "jpg": ".jpg"}  # the output formats (params.OUTPUT_FORMATS)
# zlib level 1: a third of Pillow's default level 6's time for files a sixth larger; on a GPU the
# whole 4-step pass takes less than level 6's encoding (bench/RESULTS.md, "PNG compress_level").
PNG_COMPRESS_LEVEL = 1
# libwebp's default effort: faster methods make larger files, slower ones barely smaller ones
# (bench/RESULTS.md, "Encoder settings").
WEBP_METHOD = 4


@torch.no_grad()
def decode(vae: AutoencoderKL | AutoencoderTiny, latents: torch.Tensor, chunk: int) -> np.ndarray:
    """Decode latents to uint8 RGB arrays (N, H, W, 3), `chunk` images per VAE pass.

    Rounded as diffusers' image processor rounds ((x / 2 + 0.5) clamped, * 255, rounded), but on
    the device, so only bytes cross to the host.
    """
    out = []
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    for part in latents.split(chunk):
        image = vae.decode(part, return_dict=False)[0]
        pixels = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        out.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def load_input_image(path: str | os.PathLike, field: str = "image") -> Image.Image:
    """Read an uploaded image as upright 8-bit RGB, refusing anything that is not a sane image.

    `field` is the input it came in (`image`, `mask`, `control_image`): errors name it.

    The size is checked from the header before any pixel is decoded, so a small file that
    claims to be huge (a decompression bomb) costs nothing. EXIF orientation is applied,
    transparency is flattened onto white, and palette, grayscale, CMYK and 16-bit images are
    converted. Animated GIF, WebP and PNG files give their first frame.
    """
    name = Path(path).name
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise InputError(field, name, f"{_ACCEPTED}; this file cannot be read ({exc.strerror})") from exc
    if size == 0:
        raise InputError(field, name, f"{_ACCEPTED}; this file is empty")
    if size > MAX_INPUT_BYTES:
        raise InputError(field, name, f"{_ACCEPTED}; this file is {size / 1_000_000:.1f} MB")
    try:
        # Our limit is below Pillow's warning threshold, so the check below refuses those images
        # with their real size; Pillow's DecompressionBombError (over twice its threshold) remains.
        with warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning):
            image = Image.open(path, formats=INPUT_FORMATS)
    except Image.DecompressionBombError as exc:
        over = Image.MAX_IMAGE_PIXELS * 2 // 1_000_000
        raise InputError(field, name, f"{_ACCEPTED}; this one has over {over} megapixels") from exc
    except Exception as exc:  # Pillow's identify step raises many types on odd input
        unknown = "this file is not an image in one of those formats"
        raise InputError(field, name, f"{_ACCEPTED}; {unknown}") from exc
    with image:
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise InputError(
                field,
                name,
                f"{_ACCEPTED}; this one is {width}x{height} ({width * height / 1_000_000:.1f} megapixels)",
            )
        try:
            return _upright_rgb(image)
        except MemoryError:
            raise
        except Exception as exc:  # truncated data, bad chunks, unsupported encodings: all the user's file
            damaged = "this file is damaged or cut short, or uses an encoding Pillow cannot read"
            raise InputError(field, name, f"{_ACCEPTED}; {damaged}") from exc


def _upright_rgb(image: Image.Image) -> Image.Image:
    """Decode the first frame, apply EXIF orientation and reduce any mode to 8-bit RGB."""
    image = ImageOps.exif_transpose(image)  # loads the pixels; raises on truncated data
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion to L clips at 255 instead of scaling; 65535 / 257 = 255.
        # "I" is how some decoders hand over 16-bit samples, so it is scaled the same way.
        scaled = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height (Lanczos) and crop the centre: no distortion, exact size."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def save_image(
    pixels: np.ndarray, path_stem: str | os.PathLike, fmt: str, quality: int, metadata: dict[str, Any]
) -> Path:
    """Write one (H, W, 3) uint8 image as <path_stem>.<ext>, carrying its generation metadata.

    fmt is one of EXTENSIONS' keys (checked by lcm.params). PNG is lossless and ignores quality;
    WebP and JPEG (4:2:0 chroma, no optimize pass) use it, 1-100.
    """
    path = Path(os.fspath(path_stem) + EXTENSIONS[fmt])
    options: dict[str, Any] = {
        "png": {"format": "PNG", "compress_level": PNG_COMPRESS_LEVEL},
        "webp": {"format": "WEBP", "quality": quality, "method": WEBP_METHOD},
        "jpg": {"format": "JPEG", "quality": quality, "optimize": False},
    }[fmt]
    Image.fromarray(pixels).save(path, **options, **save_options(fmt, metadata))
    return path


def save_control_image(edges: Image.Image, path_stem: str | os.PathLike) -> Path:
    """Write the ControlNet's edge map as <path_stem>.png: lossless, and without generation metadata,
    so `python -m lcm reproduce` never takes it for a generated image."""
    path = Path(os.fspath(path_stem) + EXTENSIONS["png"])
    edges.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return path
