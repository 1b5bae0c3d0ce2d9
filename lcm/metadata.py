"""Generation parameters inside every output file, so any file can be regenerated from itself.

The engine hands over an opaque JSON-serialisable dict with at least "prompt" and "seed"; the
other keys it names (num_inference_steps, guidance_scale, width, height, ...) feed the
human-readable summary when present. Per format:

- PNG: an iTXt chunk "lcm" holding the JSON (UTF-8), and a "parameters" text chunk in the
  AUTOMATIC1111 layout that other Stable Diffusion tools read.
- WebP and JPEG: an XMP packet with the JSON in the lcm namespace, and EXIF with Software,
  ImageDescription (the prompt, when it is printable ASCII) and UserComment (the JSON).

read_metadata prefers the iTXt or XMP copy and falls back to EXIF UserComment.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from PIL import ExifTags, Image, PngImagePlugin

import lcm
from lcm.errors import InputError

PNG_KEY = "lcm"
XMP_NAMESPACE = "urn:lcm-cog:metadata:1.0/"
XMP_PROPERTY = f"{{{XMP_NAMESPACE}}}json"
SOFTWARE = f"lcm-cog {lcm.__version__}"
READABLE_FORMATS = ("PNG", "JPEG", "WEBP")

# EXIF UserComment starts with an 8-byte character code; UNICODE text is UTF-16 in the
# byte order of the EXIF block it sits in.
_ASCII = b"ASCII\0\0\0"
_UNICODE = b"UNICODE\0"

# Characters that UTF-8 cannot encode (lone surrogates) or XML 1.0 forbids (U+FFFE, U+FFFF);
# json.dumps already escapes the C0 controls.
_UNSAFE = re.compile("[\ud800-\udfff\ufffe\uffff]")

_NOT_FOUND = "an image written by this project (PNG, WebP or JPEG with lcm metadata)"


def to_json(metadata: dict[str, Any]) -> str:
    """Readable JSON (non-ASCII kept as is) that survives UTF-8, UTF-16 and XML unchanged."""
    if not _is_ours(metadata):
        raise ValueError(f"metadata needs a str 'prompt' and an int 'seed'; got keys {sorted(metadata)}")
    text = json.dumps(metadata, ensure_ascii=False, allow_nan=False)
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def parameters_text(metadata: dict[str, Any]) -> str:
    """The AUTOMATIC1111 "parameters" layout: the prompt, then one line of "Key: value" pairs."""
    m = metadata
    fields: list[tuple[str, Any]] = [
        ("Steps", m.get("num_inference_steps")),
        ("Sampler", "LCM"),
        ("CFG scale", m.get("guidance_scale")),
        ("Seed", m["seed"]),
        ("Size", f"{m['width']}x{m['height']}" if "width" in m and "height" in m else None),
        ("Model", m.get("model")),
        ("Denoising strength", m.get("prompt_strength")),
        # A1111 counts the last layer as 1; diffusers and this project count it as 0.
        ("Clip skip", m["clip_skip"] + 1 if m.get("clip_skip") else None),
        ("LCM origin steps", m.get("lcm_origin_steps")),
        ("Version", m.get("version")),
    ]
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in fields if value is not None)
    return f"{m['prompt']}\n{line}"


def _quote(value: Any) -> str:
    """Quote a value the way A1111 does when it would break the comma-separated line."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


def png_info(metadata: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """PNG text chunks: the JSON as iTXt "lcm", the A1111 summary as "parameters"."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PNG_KEY, to_json(metadata))
    info.add_text("parameters", _UNSAFE.sub("\ufffd", parameters_text(metadata)))
    return info


def exif_bytes(metadata: dict[str, Any]) -> bytes:
    """EXIF for WebP and JPEG: Software, ASCII-safe prompt as ImageDescription, JSON as UserComment."""
    text = to_json(metadata)
    exif = Image.Exif()
    exif[ExifTags.Base.Software] = SOFTWARE
    prompt = metadata["prompt"]
    if prompt and prompt.isascii() and prompt.isprintable():
        exif[ExifTags.Base.ImageDescription] = prompt
    comment = _ASCII + text.encode("ascii") if text.isascii() else _UNICODE + text.encode(_utf16(exif))
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = comment
    return exif.tobytes()


def _utf16(exif: Image.Exif) -> str:
    """The UTF-16 codec matching the EXIF block's byte order (Pillow writes big-endian by default)."""
    return "utf-16-le" if exif.endian == "<" else "utf-16-be"


def xmp_packet(metadata: dict[str, Any]) -> bytes:
    """An XMP packet carrying the JSON as the text of one lcm:json property."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        f'  <rdf:Description rdf:about="" xmlns:lcm="{XMP_NAMESPACE}">\n'
        f"   <lcm:json>{escape(to_json(metadata))}</lcm:json>\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="w"?>'
    ).encode("utf-8")


def save_options(fmt: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for Image.save that embed the metadata in format fmt ("png", "webp", "jpg").

    JPEG holds EXIF and XMP in 64 KB segments each; with params.MAX_PROMPT_CHARS at 5,000 the
    worst case (every character escaped) stays under that, and a test keeps it so.
    """
    if fmt == "png":
        return {"pnginfo": png_info(metadata)}
    return {"exif": exif_bytes(metadata), "xmp": xmp_packet(metadata)}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The generation parameters of a file this project wrote, from any of its three formats."""
    name = Path(path).name
    try:
        with Image.open(path, formats=READABLE_FORMATS) as image:
            for text in _embedded_json(image):
                found = _parse(text)
                if found is not None:
                    return found
    except Exception as exc:  # whatever a damaged file makes Pillow raise, the answer is the same
        raise InputError("file", name, _NOT_FOUND) from exc
    raise InputError("file", name, _NOT_FOUND)


def _embedded_json(image: Image.Image) -> Iterator[str]:
    """Candidate JSON texts, preferred first: PNG iTXt, then XMP, then EXIF UserComment."""
    text = image.info.get(PNG_KEY)
    if isinstance(text, str):
        yield text
    xmp = image.info.get("xmp")
    if isinstance(xmp, bytes):
        text = _from_xmp(xmp)
        if text is not None:
            yield text
    text = _from_user_comment(image.getexif())
    if text is not None:
        yield text


def _from_xmp(xmp: bytes) -> str | None:
    """The lcm:json property, written as an element (ours) or an attribute (after some rewriters)."""
    try:
        root = ElementTree.fromstring(xmp)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag == XMP_PROPERTY:
            return element.text or ""
        if XMP_PROPERTY in element.attrib:
            return element.attrib[XMP_PROPERTY]
    return None


def _from_user_comment(exif: Image.Exif) -> str | None:
    comment = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if not isinstance(comment, bytes):
        return None
    code, body = comment[:8], comment[8:]
    if code == _ASCII:
        return body.decode("ascii", errors="replace")
    if code == _UNICODE:
        return body.decode(_utf16(exif), errors="replace")
    return None


def _parse(text: str) -> dict[str, Any] | None:
    """The JSON object if it is ours, else None."""
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return found if _is_ours(found) else None


def _is_ours(value: Any) -> bool:
    """A dict with the two keys every file of this project carries: a str prompt and an int seed."""
    return (
        isinstance(value, dict)
        and isinstance(value.get("prompt"), str)
        and isinstance(value.get("seed"), int)
    )
