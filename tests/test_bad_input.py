"""Every malformed, odd or hostile input a stranger can send, through Cog's real HTTP server.

One table decides each case: refused by the schema (422), unparsable JSON (400), a failed
prediction whose message names the field and what is allowed, or valid and answered with
images of a sensible size. After every refusal a cheap valid request must still succeed.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from PIL import Image

from lcm.metadata import read_metadata

BASE = {"prompt": "a photo of a cat", "width": 256, "height": 256, "num_inference_steps": 1}
CHEAP = {**BASE, "disable_safety_checker": True}
FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}


@dataclass(frozen=True)
class Expect:
    """What the server must answer: 422, 400, failed or succeeded."""

    outcome: str
    field: Optional[str] = None
    words: tuple[str, ...] = ()
    size: tuple[int, int] = (256, 256)
    count: int = 1
    same_as: Optional[dict] = None  # a request whose images must be these, pixel for pixel


def refused(field: str, *words: str) -> Expect:
    return Expect("422", field, words)


def unparsable(field: str, *words: str) -> Expect:
    return Expect("400", field, words)


def failed(field: Optional[str], *words: str) -> Expect:
    return Expect("failed", field, words)


def ok(size: tuple[int, int] = (256, 256), count: int = 1, same_as: Optional[dict] = None) -> Expect:
    return Expect("succeeded", size=size, count=count, same_as=same_as)


def raw_body(**fragments: str) -> bytes:
    """BASE plus values written as raw JSON text (NaN, Infinity, ...), which json.dumps will not write."""
    extra = "".join(f',"{key}":{text}' for key, text in fragments.items())
    return ('{"input":' + json.dumps(BASE)[:-1] + extra + "}}").encode()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height over a few bytes of data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def sixteen_bit_png(width: int, height: int) -> bytes:
    ramp = (np.arange(width * height, dtype=np.uint32) * 97 % 65536).astype(np.uint16)
    return encoded(Image.fromarray(ramp.reshape(height, width)), "PNG")


def animated_gif(width: int, height: int) -> bytes:
    frames = [Image.new("P", (width, height), color) for color in (10, 120, 240)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return out.getvalue()


def exif_rotated_jpeg(width: int, height: int) -> bytes:
    """Stored landscape with EXIF orientation 6 (rotate 90 degrees): the photo is portrait."""
    image = noise(width, height)
    exif = image.getexif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", exif=exif)


def image_input(url: str, **extra: Any) -> dict[str, Any]:
    """img2img with the size left to the service, so the answer shows how it reads the image."""
    return {"prompt": "a photo of a cat", "image": url, "num_inference_steps": 1, **extra}


VALID_PNG = encoded(noise(256, 256), "PNG")


def control_input(url: str | None = None, **extra: Any) -> dict[str, Any]:
    """Text to image guided by a control image (VALID_PNG unless given); None values are left out."""
    case = {**BASE, "control_image": url or data_url(VALID_PNG), **extra}
    return {key: value for key, value in case.items() if value is not None}


CASES = [
    # --- size -----------------------------------------------------------------------------
    # Below the schema's minimum: refused before predict() runs, naming width and 256.
    pytest.param({**BASE, "width": 248}, refused("width", "minimum of 256"), id="width-below-256"),
    # Above the maximum.
    pytest.param({**BASE, "height": 1032}, refused("height", "maximum of 1024"), id="height-above-1024"),
    # Zero and negative are below the minimum too.
    pytest.param({**BASE, "width": 0}, refused("width", "minimum of 256"), id="width-zero"),
    pytest.param({**BASE, "height": -8}, refused("height", "minimum of 256"), id="height-negative"),
    # In range but not a multiple of 8: the schema cannot say it, params does, with the nearest sizes.
    pytest.param({**BASE, "width": 300}, failed("width", "multiple of 8", "296 or 304"), id="width-300"),
    pytest.param({**BASE, "height": 777}, failed("height", "multiple of 8", "776 or 784"), id="height-777"),
    # A string is not an integer.
    pytest.param({**BASE, "width": "256"}, refused("width", "integer"), id="width-string"),
    # A fractional number is not an integer.
    pytest.param({**BASE, "width": 256.5}, refused("width", "integer"), id="width-fractional"),
    # 256.0 is an integer to JSON Schema, so it passes the schema and must work as 256.
    pytest.param(
        {**BASE, "width": 256.0},
        ok(),
        id="width-integral-float",
    ),
    # Explicit null for an optional input: Cog's schema refuses it (clients omit the field).
    pytest.param({**BASE, "width": None}, refused("width", "null"), id="width-null"),
    # Non-square sizes at the bounds' multiples are fine.
    pytest.param({**BASE, "width": 264, "height": 256}, ok((264, 256)), id="width-264-valid"),
    # --- images per request ---------------------------------------------------------------------
    pytest.param({**BASE, "num_images": 0}, refused("num_images", "minimum of 1"), id="num-images-0"),
    pytest.param({**BASE, "num_images": 9}, refused("num_images", "maximum of 8"), id="num-images-9"),
    # --- steps ----------------------------------------------------------------------------------
    pytest.param(
        {**BASE, "num_inference_steps": 0}, refused("num_inference_steps", "minimum of 1"), id="steps-0"
    ),
    pytest.param(
        {**BASE, "num_inference_steps": 51}, refused("num_inference_steps", "maximum of 50"), id="steps-51"
    ),
    pytest.param(
        {**BASE, "num_inference_steps": 2.5}, refused("num_inference_steps", "integer"), id="steps-fractional"
    ),
    # --- guidance -------------------------------------------------------------------------------
    pytest.param(
        {**BASE, "guidance_scale": 0.99}, refused("guidance_scale", "minimum of 1"), id="guidance-0.99"
    ),
    pytest.param(
        {**BASE, "guidance_scale": 20.5}, refused("guidance_scale", "maximum of 20"), id="guidance-20.5"
    ),
    pytest.param({**BASE, "guidance_scale": "8"}, refused("guidance_scale", "number"), id="guidance-string"),
    # NaN and infinities are not JSON: Cog's parser answers 400 naming input.guidance_scale.
    pytest.param(raw_body(guidance_scale="NaN"), unparsable("guidance_scale"), id="guidance-NaN"),
    pytest.param(raw_body(guidance_scale="Infinity"), unparsable("guidance_scale"), id="guidance-Infinity"),
    pytest.param(raw_body(guidance_scale="-Infinity"), unparsable("guidance_scale"), id="guidance--Infinity"),
    # A literal that overflows a double.
    pytest.param(raw_body(guidance_scale="1e400"), unparsable("guidance_scale"), id="guidance-1e400"),
    # --- origin steps and strength ------------------------------------------------------------
    # Fewer origin steps than steps: each step needs its own origin timestep.
    pytest.param(
        {**BASE, "num_inference_steps": 4, "lcm_origin_steps": 2},
        failed("lcm_origin_steps", "at least num_inference_steps=4"),
        id="origin-steps-below-steps",
    ),
    pytest.param({**BASE, "lcm_origin_steps": 0}, refused("lcm_origin_steps", "minimum of 1"), id="origin-0"),
    pytest.param(
        {**BASE, "lcm_origin_steps": 1001}, refused("lcm_origin_steps", "maximum of 1000"), id="origin-1001"
    ),
    # prompt_strength without an image would silently do nothing: refused.
    pytest.param(
        {**BASE, "prompt_strength": 0.5},
        failed("prompt_strength", "only with an image"),
        id="strength-no-image",
    ),
    pytest.param(
        {**BASE, "prompt_strength": 1.5}, refused("prompt_strength", "maximum of 1"), id="strength-above-1"
    ),
    # With an image, 50 x 0.05 = 2 origin timesteps cannot feed 4 steps.
    pytest.param(
        image_input(data_url(VALID_PNG), num_inference_steps=4, prompt_strength=0.05),
        failed("prompt_strength", "at least 0.08"),
        id="strength-too-small-for-steps",
    ),
    # The tiny checkpoint's text encoder has 4 layers, so clip_skip 11 passes the schema but not the model.
    pytest.param({**BASE, "clip_skip": 11}, failed("clip_skip", "0 to 3"), id="clip-skip-beyond-model"),
    pytest.param({**BASE, "clip_skip": 12}, refused("clip_skip", "maximum of 11"), id="clip-skip-12"),
    # lora_scale: bounded by the schema; without trained weights only its default is allowed.
    pytest.param(
        {**BASE, "lora_scale": 1.6}, refused("lora_scale", "maximum of 1.5"), id="lora-scale-above-1.5"
    ),
    pytest.param(
        {**BASE, "lora_scale": -0.1}, refused("lora_scale", "minimum of 0"), id="lora-scale-negative"
    ),
    pytest.param(
        {**BASE, "lora_scale": 0.5},
        failed("lora_scale", "only with a LoRA"),
        id="lora-scale-no-lora",
    ),
    # --- prompts --------------------------------------------------------------------------------
    # Empty prompt: unconditional generation, valid.
    pytest.param({**BASE, "prompt": ""}, ok(), id="prompt-empty"),
    # Whitespace only: tokenizes to nothing, so the image is the empty prompt's.
    pytest.param(
        {**BASE, "prompt": " \t\n  ", "seed": 3},
        ok(same_as={**BASE, "prompt": "", "seed": 3}),
        id="prompt-whitespace",
    ),
    # 10,000 characters: over the cheap character bound, refused before tokenizing.
    pytest.param(
        {**BASE, "prompt": "a" * 10_000}, failed("prompt", "at most 5000 characters"), id="prompt-10k"
    ),
    # Under the character bound but over 8 windows of 75 tokens.
    pytest.param(
        {**BASE, "prompt": "cat " * 700}, failed("prompt", "at most 600 CLIP tokens"), id="prompt-700-tokens"
    ),
    # Emoji, right-to-left text, bidi overrides and NUL are text: valid, and kept exactly in the metadata.
    pytest.param({**BASE, "prompt": "🦊🔥 a fox, 🎨", "output_format": "jpg"}, ok(), id="prompt-emoji-jpg"),
    pytest.param(
        {**BASE, "prompt": "قطة على السطح, חתול", "output_format": "webp"}, ok(), id="prompt-rtl-webp"
    ),
    pytest.param({**BASE, "prompt": "a cat\u202eevil.exe"}, ok(), id="prompt-bidi-override"),
    pytest.param({**BASE, "prompt": "a\x00cat\x00"}, ok(), id="prompt-nul"),
    # A lone surrogate is not valid Unicode: Cog's parser refuses it naming input.prompt.
    pytest.param(raw_body(prompt='"a\\ud800b"'), unparsable("prompt"), id="prompt-lone-surrogate"),
    pytest.param({**BASE, "prompt": 5}, refused("prompt", "string"), id="prompt-number"),
    pytest.param({**BASE, "prompt": None}, refused("prompt", "null"), id="prompt-null"),
    # Path-like prompts are just text; test_security checks where the files go.
    pytest.param({**BASE, "prompt": "../../etc/passwd"}, ok(), id="prompt-path-like"),
    # --- prompt weighting (Compel's syntax) -----------------------------------------------------------
    # Parentheses, hyphens and quotes that weight nothing are text, encoded as written.
    pytest.param({**BASE, "prompt": 'a (photo) of a well-known "cat"'}, ok(), id="prompt-plain-parentheses"),
    # Weighted, A1111's spelling included: served, and the file keeps the prompt as sent.
    pytest.param({**BASE, "prompt": "a (photo:1.2) of a cat++"}, ok(), id="prompt-weighted"),
    # A .blend() with fewer weights than prompts: compel's own reason, naming the prompt.
    pytest.param(
        {**BASE, "prompt": '("a cat", "a dog").blend(1)'},
        failed("prompt", "Compel's weighting syntax", "mismatched prompts/weights"),
        id="prompt-blend-missing-weight",
    ),
    # A .blend() that is not the whole prompt.
    pytest.param(
        {**BASE, "prompt": '("a cat", "a dog").blend(0.5, 0.5), in a garden'},
        failed("prompt", "whole prompt"),
        id="prompt-blend-inside-text",
    ),
    # Weights that sum to 0 would divide by zero.
    pytest.param(
        {**BASE, "prompt": '("a cat", "a dog").blend(0, 0)'},
        failed("prompt", "non-zero sum"),
        id="prompt-blend-0",
    ),
    # compel parses these, but LCM has no cross-attention control and this service no LoRAs.
    pytest.param({**BASE, "prompt": "a cat.swap(dog)"}, failed("prompt", "no .swap()"), id="prompt-swap"),
    pytest.param(
        {**BASE, "prompt": "withLora(style, 0.8) a cat"}, failed("prompt", "no withLora()"), id="prompt-lora"
    ),
    # compel's parser recurses per parenthesis: deeper than 16, the prompt is text, as it was before.
    pytest.param({**BASE, "prompt": "(" * 100 + "a cat"}, ok(), id="prompt-nested-100"),
    # Each prompt of an .and() is a window of its own: nine exceed the eight windows.
    pytest.param(
        {**BASE, "prompt": '("a", "b", "c", "d", "e", "f", "g", "h", "i").and()'},
        failed("prompt", "at most 8 windows"),
        id="prompt-and-9-windows",
    ),
    # --- seeds ----------------------------------------------------------------------------------
    pytest.param({**BASE, "seed": -1}, refused("seed", "minimum of 0"), id="seed-negative"),
    pytest.param({**BASE, "seed": 2**32}, refused("seed", "maximum of 4294967295"), id="seed-2^32"),
    pytest.param({**BASE, "seed": 1.5}, refused("seed", "integer"), id="seed-float"),
    pytest.param({**BASE, "seed": "12"}, refused("seed", "integer"), id="seed-string"),
    pytest.param({**BASE, "seed": None}, refused("seed", "null"), id="seed-null"),
    pytest.param(raw_body(seed="1e400"), unparsable("seed"), id="seed-1e400"),
    # 3.0 is an integer to JSON Schema: must work as seed 3.
    pytest.param({**BASE, "seed": 3.0}, ok(same_as={**BASE, "seed": 3}), id="seed-integral-float"),
    # The largest seed is valid; image i uses (seed + i) mod 2^32 (test_features: both reproduce).
    pytest.param({**BASE, "seed": 2**32 - 1, "num_images": 2}, ok(count=2), id="seed-max-two-images"),
    # Seed 0 is a seed.
    pytest.param({**BASE, "seed": 0}, ok(), id="seed-zero"),
    # --- output ---------------------------------------------------------------------------------
    pytest.param({**BASE, "output_format": "gif"}, refused("output_format", "png"), id="format-gif"),
    pytest.param({**BASE, "output_format": "PNG"}, refused("output_format", "png"), id="format-uppercase"),
    pytest.param({**BASE, "output_format": ""}, refused("output_format", "png"), id="format-empty"),
    pytest.param({**BASE, "output_quality": 0}, refused("output_quality", "minimum of 1"), id="quality-0"),
    pytest.param(
        {**BASE, "output_quality": 101}, refused("output_quality", "maximum of 100"), id="quality-101"
    ),
    pytest.param(
        {**BASE, "output_quality": "high"}, refused("output_quality", "integer"), id="quality-string"
    ),
    # Quality with png is accepted and has no effect.
    pytest.param({**BASE, "output_quality": 1, "output_format": "png"}, ok(), id="quality-with-png"),
    pytest.param(
        {**BASE, "disable_safety_checker": "yes"},
        refused("disable_safety_checker", "boolean"),
        id="bool-string",
    ),
    pytest.param({**BASE, "freeu": "yes"}, refused("freeu", "boolean"), id="freeu-string"),
    pytest.param({**BASE, "freeu": 1}, refused("freeu", "boolean"), id="freeu-number"),
    # FreeU changes the UNet, so it works with an input image and a mask too, and with a weighted prompt.
    pytest.param(image_input(data_url(VALID_PNG), freeu=True), ok(), id="freeu-img2img"),
    pytest.param(
        image_input(data_url(VALID_PNG), mask=data_url(VALID_PNG), freeu=True, prompt="a (red:1.3) cat++"),
        ok(),
        id="freeu-inpaint-weighted",
    ),
    # --- unknown fields and malformed bodies ------------------------------------------------------
    # Cog drops fields the schema does not list: the request works as if they were absent.
    pytest.param(
        {**BASE, "negative_prompt": "blurry", "foo": [1, 2], "seed": 3},
        ok(same_as={**BASE, "seed": 3}),
        id="unknown-fields",
    ),
    pytest.param(b'{"input": ', unparsable("input", "EOF"), id="body-truncated-json"),
    pytest.param(b'{"input": [1, 2]}', refused("__root__", "object"), id="body-input-list"),
    # --- input images: valid ones, with the size the service picks ----------------------------------
    # A normal PNG keeps its size.
    pytest.param(image_input(data_url(VALID_PNG)), ok((256, 256)), id="image-png"),
    # 1x1: scaled up so its shorter side is 256.
    pytest.param(image_input(data_url(encoded(noise(1, 1), "PNG"))), ok((256, 256)), id="image-1x1"),
    # CMYK JPEG: converted to RGB.
    pytest.param(
        image_input(data_url(encoded(noise(320, 256, "CMYK"), "JPEG"), "image/jpeg")),
        ok((320, 256)),
        id="image-cmyk-jpeg",
    ),
    # 16-bit grayscale PNG: scaled to 8 bits.
    pytest.param(image_input(data_url(sixteen_bit_png(256, 320))), ok((256, 320)), id="image-16-bit-png"),
    # Palette PNG 64x32: 2:1, upscaled to a 256 shorter side.
    pytest.param(
        image_input(data_url(encoded(noise(64, 32, "P"), "PNG"))), ok((512, 256)), id="image-palette"
    ),
    # RGBA: transparency flattened onto white.
    pytest.param(image_input(data_url(encoded(noise(256, 256, "RGBA"), "PNG"))), ok(), id="image-alpha"),
    # Animated GIF: its first frame.
    pytest.param(image_input(data_url(animated_gif(128, 128), "image/gif")), ok(), id="image-animated-gif"),
    # EXIF orientation 6: stored 320x256, upright 256x320, so the output is portrait.
    pytest.param(
        image_input(data_url(exif_rotated_jpeg(320, 256), "image/jpeg")),
        ok((256, 320)),
        id="image-exif-rotated",
    ),
    # WebP and BMP are listed formats.
    pytest.param(
        image_input(data_url(encoded(noise(256, 256), "WEBP"), "image/webp")), ok(), id="image-webp"
    ),
    pytest.param(image_input(data_url(encoded(noise(256, 256), "BMP"), "image/bmp")), ok(), id="image-bmp"),
    # The content decides, not the data URL's declared type.
    pytest.param(image_input(data_url(VALID_PNG, "image/jpeg")), ok(), id="image-png-labelled-jpeg"),
    # Explicit size with an image: the image is fitted (scaled and centre-cropped) to it.
    pytest.param(
        image_input(data_url(VALID_PNG), width=384, height=256), ok((384, 256)), id="image-with-size"
    ),
    # --- input images: refused --------------------------------------------------------------------
    pytest.param(image_input("data:image/png;base64,"), failed("image", "empty"), id="image-empty-file"),
    pytest.param(
        image_input(data_url(b"just some text\n", "text/plain")),
        failed("image", "not an image"),
        id="image-text",
    ),
    pytest.param(
        image_input(data_url(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml")),
        failed("image", "not an image"),
        id="image-svg",
    ),
    pytest.param(
        image_input(data_url(VALID_PNG[: len(VALID_PNG) // 3])),
        failed("image", "cut short"),
        id="image-truncated",
    ),
    # 20000x20000 claimed by a tiny file: refused from the header, before any pixel is decoded.
    pytest.param(
        image_input(data_url(png_header_only(20000, 20000))),
        failed("image", "megapixels"),
        id="image-bomb-20000",
    ),
    # 56 MP: above our 50 MP limit but under Pillow's own bomb threshold.
    pytest.param(
        image_input(data_url(png_header_only(8000, 7000))),
        failed("image", "8000x7000"),
        id="image-56-megapixels",
    ),
    # Broken data URL: Cog's own download fails before predict(), and says why.
    pytest.param(
        image_input("data:image/png;base64,@@not-base64@@"), failed(None, "base64"), id="image-bad-base64"
    ),
    # Unreachable URL (a closed loopback port): Cog's download fails and names the address.
    pytest.param(image_input("http://127.0.0.1:9/x.png"), failed(None, "port=9"), id="image-unreachable-url"),
    # Not a URL: Cog passes the string on as a path; predict() takes only files Cog downloaded.
    pytest.param(image_input("just words"), failed("image", "http(s) or data: URL"), id="image-not-a-url"),
    # A path on the server is refused the same way, so no caller can read server files into img2img.
    pytest.param(image_input("/etc/passwd"), failed("image", "not accepted"), id="image-server-path"),
    # --- inpainting masks: read with the image's checks, errors naming mask --------------------------
    # A mask without the image it masks would silently do nothing: refused naming both.
    pytest.param(
        {**BASE, "mask": data_url(VALID_PNG)},
        failed("mask", "only together with image"),
        id="mask-without-image",
    ),
    pytest.param(
        image_input(data_url(VALID_PNG), mask=data_url(b"just some text\n", "text/plain")),
        failed("mask", "not an image"),
        id="mask-text",
    ),
    pytest.param(
        image_input(data_url(VALID_PNG), mask="data:image/png;base64,"),
        failed("mask", "empty"),
        id="mask-empty",
    ),
    pytest.param(
        image_input(data_url(VALID_PNG), mask=data_url(png_header_only(20000, 20000))),
        failed("mask", "megapixels"),
        id="mask-bomb-20000",
    ),
    # A path on the server is refused as for image: take_downloads checks every file input.
    pytest.param(
        image_input(data_url(VALID_PNG), mask="/etc/passwd"),
        failed("mask", "not accepted"),
        id="mask-server-path",
    ),
    # Another size and aspect than the image, with transparency: fitted as the image is, the
    # transparent part flattened onto white (redrawn); the output keeps the image's size.
    pytest.param(
        image_input(
            data_url(encoded(noise(320, 160, "RGBA"), "PNG")),
            mask=data_url(encoded(noise(96, 96, "LA"), "PNG")),
        ),
        ok((512, 256)),
        id="mask-other-size-with-alpha",
    ),
    # --- the canny ControlNet ------------------------------------------------------------------------
    pytest.param(
        control_input(controlnet_conditioning_scale=4.5),
        refused("controlnet_conditioning_scale", "maximum of 4"),
        id="control-scale-4.5",
    ),
    pytest.param(
        control_input(controlnet_conditioning_scale=-0.1),
        refused("controlnet_conditioning_scale", "minimum of 0"),
        id="control-scale-negative",
    ),
    pytest.param(
        control_input(control_guidance_end=1.5),
        refused("control_guidance_end", "maximum of 1"),
        id="control-end-1.5",
    ),
    pytest.param(
        control_input(canny_low_threshold=0), refused("canny_low_threshold", "minimum of 1"), id="canny-low-0"
    ),
    pytest.param(
        control_input(canny_high_threshold=256),
        refused("canny_high_threshold", "maximum of 255"),
        id="canny-high-256",
    ),
    pytest.param(
        control_input(canny_low_threshold=50.5),
        refused("canny_low_threshold", "integer"),
        id="canny-low-fractional",
    ),
    pytest.param(
        control_input(return_control_image="yes"),
        refused("return_control_image", "boolean"),
        id="control-return-string",
    ),
    # Crossed bounds pass the schema; the message names both fields.
    pytest.param(
        control_input(control_guidance_start=0.5, control_guidance_end=0.5),
        failed("control_guidance_start", "less than control_guidance_end=0.5"),
        id="control-end-equals-start",
    ),
    pytest.param(
        control_input(canny_low_threshold=200, canny_high_threshold=100),
        failed("canny_low_threshold", "less than canny_high_threshold=100"),
        id="canny-low-above-high",
    ),
    # Inpainting with a ControlNet is not offered: refused naming both.
    pytest.param(
        control_input(image=data_url(VALID_PNG), mask=data_url(VALID_PNG)),
        failed("control_image", "not together with mask"),
        id="control-image-with-mask",
    ),
    # A ControlNet setting without a control image would silently do nothing: refused.
    pytest.param(
        {**BASE, "control_guidance_start": 0.5},
        failed("control_guidance_start", "only with a control_image"),
        id="control-setting-without-image",
    ),
    pytest.param(
        control_input(data_url(b"just some text\n", "text/plain")),
        failed("control_image", "not an image"),
        id="control-image-text",
    ),
    pytest.param(
        control_input(data_url(png_header_only(20000, 20000))),
        failed("control_image", "megapixels"),
        id="control-image-bomb",
    ),
    pytest.param(
        control_input("/etc/passwd"), failed("control_image", "not accepted"), id="control-image-server-path"
    ),
    # Without a size the output follows the control image; with an image too, the image.
    pytest.param(
        control_input(data_url(encoded(noise(320, 256), "PNG")), width=None, height=None),
        ok((320, 256)),
        id="control-image-sets-size",
    ),
    pytest.param(
        control_input(image=data_url(encoded(noise(64, 32, "P"), "PNG")), width=None, height=None),
        ok((512, 256)),
        id="control-image-follows-image",
    ),
]


def send(server, case: dict | bytes) -> tuple[int, Any]:
    if isinstance(case, bytes):
        return server.send_when_free("POST", "/predictions", raw=case)
    return server.send_when_free("POST", "/predictions", {"input": case})


def check_answer(server, status: int, body: Any, expect: Expect, case: dict | bytes, tmp_path: Path) -> None:
    if expect.outcome == "422":
        assert status == 422, body
        (problem,) = body["detail"]
        assert problem["loc"][-1] == expect.field, problem
        assert all(word in problem["msg"] for word in expect.words), problem
    elif expect.outcome == "400":
        assert status == 400, body
        assert f"input.{expect.field}" in body or expect.field == "input", body
        assert all(word in body for word in expect.words), body
    elif expect.outcome == "failed":
        assert status == 200 and body["status"] == "failed", body
        if expect.field is not None:
            assert f"{expect.field}=" in body["error"], body["error"]
        assert all(word in body["error"] for word in expect.words), body["error"]
    else:
        assert status == 200 and body["status"] == "succeeded", body
        check_images(body["output"], expect, case, tmp_path)
        if expect.same_as is not None:
            status, other = send(server, expect.same_as)
            assert status == 200 and other["status"] == "succeeded", other
            assert [pixels(url) for url in body["output"]] == [pixels(url) for url in other["output"]]


def pixels(url: str) -> bytes:
    with Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))) as image:
        return image.convert("RGB").tobytes()


def check_images(output: list[str], expect: Expect, case: dict, tmp_path: Path) -> None:
    """The files come back in the asked format and size, carrying the prompt exactly as sent."""
    assert len(output) == expect.count
    fmt = case.get("output_format", "png")
    for i, url in enumerate(output):
        raw = base64.b64decode(url.partition(",")[2])
        with Image.open(io.BytesIO(raw)) as image:
            assert image.format == FORMATS[fmt] and image.size == expect.size, (image.format, image.size)
        path = tmp_path / f"out-{i}.{fmt}"
        path.write_bytes(raw)
        meta = read_metadata(path)
        assert meta["prompt"] == case["prompt"]
        if "seed" in case:
            assert meta["seed"] == (case["seed"] + i) % 2**32 and isinstance(meta["seed"], int)


@pytest.mark.parametrize("case, expect", CASES)
def test_bad_input_battery(server, case: dict | bytes, expect: Expect, tmp_path: Path) -> None:
    status, body = send(server, case)
    check_answer(server, status, body, expect, case, tmp_path)
    if expect.outcome != "succeeded":
        status, after = server.predict(**CHEAP)
        assert status == 200 and after["status"] == "succeeded", after
