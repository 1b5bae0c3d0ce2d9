"""Output files: each format writes, opens, and carries its generation parameters back out intact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from lcm import images, metadata, params
from lcm.errors import InputError
from lcm.params import MAX_PROMPT_CHARS, Request

PILLOW_FORMATS = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}
TRICKY = 'a "quoted" cat \\ back\\slash\nnew line 🐱‍👤🎨 שלום עולם مرحبا, done'
PROMPTS = {
    "ascii": "a watercolor fox in the snow",
    "tricky": TRICKY,
    "long": ("a very long prompt 🎨 " * 100)[:2000],
    "empty": "",
    "lone-surrogate": "broken \ud83d half",
}


def meta(prompt: str = "a cat", **extra) -> dict:
    return {
        "prompt": prompt,
        "seed": 123,
        "num_inference_steps": 4,
        "guidance_scale": 8.0,
        "lcm_origin_steps": 50,
        "width": 48,
        "height": 32,
        "clip_skip": 0,
        "image_sha256": None,
        "model": "SimianLuo/LCM_Dreamshaper_v7",
        "version": "0.1.0",
        **extra,
    }


def pixels(width: int = 48, height: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", params.OUTPUT_FORMATS)
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_metadata_round_trips(tmp_path, fmt, prompt):
    written = meta(prompt)
    path = images.save_image(pixels(), tmp_path / "out", fmt, 90, written)
    assert path == tmp_path / f"out{images.EXTENSIONS[fmt]}"
    assert metadata.read_metadata(path) == written


@pytest.mark.parametrize("fmt", params.OUTPUT_FORMATS)
def test_written_files_open_with_their_format_and_size(tmp_path, fmt):
    path = images.save_image(pixels(48, 32), tmp_path / "out", fmt, 90, meta())
    with Image.open(path) as image:
        assert image.format == PILLOW_FORMATS[fmt]
        assert image.size == (48, 32)
        assert image.mode == "RGB"


def test_png_is_lossless(tmp_path):
    original = pixels()
    path = images.save_image(original, tmp_path / "out", "png", 90, meta())
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), original)


def test_stem_with_dots_keeps_its_name(tmp_path):
    path = images.save_image(pixels(), tmp_path / "lcm-1.5", "jpg", 90, meta())
    assert path.name == "lcm-1.5.jpg" and path.exists()


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_quality_changes_lossy_file_size(tmp_path, fmt):
    low = images.save_image(pixels(128, 128), tmp_path / "low", fmt, 10, meta())
    high = images.save_image(pixels(128, 128), tmp_path / "high", fmt, 95, meta())
    assert low.stat().st_size < high.stat().st_size


def test_quality_does_not_change_png_bytes(tmp_path):
    low = images.save_image(pixels(), tmp_path / "low", "png", 10, meta())
    high = images.save_image(pixels(), tmp_path / "high", "png", 95, meta())
    assert low.read_bytes() == high.read_bytes()


@pytest.mark.parametrize("fmt", params.OUTPUT_FORMATS)
def test_same_input_gives_same_bytes(tmp_path, fmt):
    first = images.save_image(pixels(), tmp_path / "a", fmt, 80, meta(TRICKY))
    second = images.save_image(pixels(), tmp_path / "b", fmt, 80, meta(TRICKY))
    assert first.read_bytes() == second.read_bytes()


def test_engine_metadata_round_trips(tmp_path):
    request = Request.build("a lighthouse at dusk", seed=7, num_images=2)
    written = request.metadata(request.seeds[1])
    path = images.save_image(pixels(), tmp_path / "out", "webp", 90, written)
    assert metadata.read_metadata(path) == written


# --- what each format holds ----------------------------------------------------------------------------


def test_png_holds_json_and_a1111_parameters(tmp_path):
    path = images.save_image(pixels(), tmp_path / "out", "png", 90, meta(TRICKY, width=768, height=768))
    with Image.open(path) as image:
        assert isinstance(image.info["lcm"], str)
        assert image.info["parameters"] == (
            f"{TRICKY}\nSteps: 4, Sampler: LCM, CFG scale: 8.0, Seed: 123, Size: 768x768, "
            "Model: SimianLuo/LCM_Dreamshaper_v7, LCM origin steps: 50, Version: 0.1.0"
        )


def test_a1111_parameters_translate_and_quote():
    text = metadata.parameters_text(
        {"prompt": "p", "seed": 1, "clip_skip": 2, "prompt_strength": 0.5, "model": "a, b"}
    )
    assert text == 'p\nSampler: LCM, Seed: 1, Model: "a, b", Denoising strength: 0.5, Clip skip: 3'


@pytest.mark.parametrize("fmt", ["webp", "jpg"])
def test_lossy_formats_hold_exif_and_xmp(tmp_path, fmt):
    path = images.save_image(pixels(), tmp_path / "out", fmt, 90, meta("a plain prompt"))
    with Image.open(path) as image:
        exif = image.getexif()
        assert exif[ExifTags.Base.Software] == metadata.SOFTWARE
        assert metadata.SOFTWARE.startswith("lcm-cog ")
        assert exif[ExifTags.Base.ImageDescription] == "a plain prompt"
        comment = exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        assert comment.startswith(b"ASCII\0\0\0")
        assert metadata.XMP_NAMESPACE.encode() in image.info["xmp"]


@pytest.mark.parametrize("prompt", [TRICKY, "tab\tseparated", "é"])
def test_exif_leaves_out_prompts_that_are_not_printable_ascii(tmp_path, prompt):
    path = images.save_image(pixels(), tmp_path / "out", "jpg", 90, meta(prompt))
    with Image.open(path) as image:
        exif = image.getexif()
        assert ExifTags.Base.ImageDescription not in exif
        comment = exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
    if prompt.isascii():  # JSON escapes the tab, so the comment itself is ASCII
        assert comment.startswith(b"ASCII\0\0\0")
    else:
        assert comment.startswith(b"UNICODE\0")
        codec = "utf-16-le" if exif.endian == "<" else "utf-16-be"
        assert json.loads(comment[8:].decode(codec))["prompt"] == prompt


def _jpeg_with(tmp_path: Path, name: str, **blocks) -> Path:
    path = tmp_path / name
    Image.fromarray(pixels()).save(path, format="JPEG", **blocks)
    return path


def test_reading_prefers_xmp_and_falls_back_to_exif(tmp_path):
    from_xmp, from_exif = meta("from xmp"), meta("from exif")
    both = _jpeg_with(
        tmp_path, "both.jpg", xmp=metadata.xmp_packet(from_xmp), exif=metadata.exif_bytes(from_exif)
    )
    assert metadata.read_metadata(both) == from_xmp
    exif_only = _jpeg_with(tmp_path, "exif.jpg", exif=metadata.exif_bytes(from_exif))
    assert metadata.read_metadata(exif_only) == from_exif
    foreign_xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    fallback = _jpeg_with(tmp_path, "foreign.jpg", xmp=foreign_xmp, exif=metadata.exif_bytes(from_exif))
    assert metadata.read_metadata(fallback) == from_exif


def test_xmp_property_written_as_an_attribute_is_read(tmp_path):
    from xml.sax.saxutils import quoteattr

    written = meta(TRICKY)
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:lcm="{metadata.XMP_NAMESPACE}" '
        f"lcm:json={quoteattr(metadata.to_json(written))}/></rdf:RDF></x:xmpmeta>"
    )
    assert metadata.read_metadata(_jpeg_with(tmp_path, "attr.jpg", xmp=xmp.encode())) == written


@pytest.mark.parametrize("unit", ["\x01", "&", '"', "😀", "\ud83d"])
def test_longest_allowed_prompt_fits_jpeg_segments(tmp_path, unit):
    # JPEG caps EXIF and XMP at 64 KB each; these characters expand most when escaped.
    prompt = ("é" + unit * MAX_PROMPT_CHARS)[:MAX_PROMPT_CHARS]
    written = meta(prompt)
    path = images.save_image(pixels(), tmp_path / "out", "jpg", 90, written)
    assert metadata.read_metadata(path) == written
    assert (
        metadata.read_metadata(_jpeg_with(tmp_path, "exif.jpg", exif=metadata.exif_bytes(written))) == written
    )


def test_metadata_needs_prompt_and_seed(tmp_path):
    with pytest.raises(ValueError, match="'prompt' and an int 'seed'"):
        images.save_image(pixels(), tmp_path / "out", "png", 90, {"prompt": "no seed"})


# --- files without our metadata ------------------------------------------------------------------------


def _plain_png(tmp_path: Path) -> Path:
    path = tmp_path / "plain.png"
    Image.fromarray(pixels()).save(path)
    return path


def _plain_webp(tmp_path: Path) -> Path:
    path = tmp_path / "plain.webp"
    Image.fromarray(pixels()).save(path, exif=Image.Exif().tobytes())
    return path


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    return path


def _gif(tmp_path: Path) -> Path:
    path = tmp_path / "anim.gif"
    Image.fromarray(pixels()).save(path)
    return path


def _json_without_seed(tmp_path: Path) -> Path:
    path = tmp_path / "other.jpg"
    Image.fromarray(pixels()).save(path, xmp=metadata.xmp_packet(meta()).replace(b'"seed"', b'"sed"'))
    return path


def _broken_xmp(tmp_path: Path) -> Path:
    return _jpeg_with(tmp_path, "broken.jpg", xmp=b"<x:xmpmeta><unclosed>")


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "gone.png"


@pytest.mark.parametrize(
    "make", [_plain_png, _plain_webp, _text_file, _gif, _json_without_seed, _broken_xmp, _missing]
)
def test_files_without_our_metadata_are_refused(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(InputError) as caught:
        metadata.read_metadata(path)
    assert str(caught.value) == (
        f"file={path.name!r} is not allowed: an image written by this project "
        "(PNG, WebP or JPEG with lcm metadata)"
    )
