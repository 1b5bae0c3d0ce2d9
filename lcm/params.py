"""Request parameters: each input's name, default and bounds, declared once, and validated once.

INPUTS is the one table of the service's inputs, by the names the API uses (predict.py, HTTP, the
command line). Request.build validates them, metadata stores and reads them by these names, and
the CLI's flags are made from them. predict.py repeats them as literals because `cog build` reads
its source statically; a test holds every default, bound and choice there to this table.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from PIL import Image

import lcm
from lcm import downloads, images, prompts
from lcm.errors import InputError
from lcm.weights import file_sha256

if TYPE_CHECKING:
    from lcm import lora

MIN_SIZE = 256
MAX_SIZE = 1024
SIZE_MULTIPLE = 8
DEFAULT_SIZE = 768
MAX_IMAGES = 8
MAX_STEPS = 50
MIN_GUIDANCE = 1.0
MAX_GUIDANCE = 20.0
MAX_ORIGIN_STEPS = 1000  # the scheduler's num_train_timesteps
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 5000  # a cheap bound before tokenizing; the real limit is prompts.MAX_WINDOWS
MAX_LORA_SCALE = 1.5
MAX_URL_CHARS = 2048  # what browsers and CDNs reliably carry; presigned URLs run to ~1,500
MAX_CLIP_SKIP = 11  # the real text encoder has 12 layers; the engine checks the loaded one
MAX_CONTROL_SCALE = 4.0
OUTPUT_FORMATS = tuple(images.EXTENSIONS)
DEFAULT_PROMPT = "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k"
LORA_SHA256_KEY = "lora_weights_sha256"  # in a file's metadata, with lora_weights
WEIGHTING_KEY = "prompt_weighting"  # in a file's metadata, "compel" where the prompt was weighted


@dataclass(frozen=True)
class Spec:
    """One input: its API name, default, type and bounds, and a line of help for the command line.

    `optional`: None is allowed (and means: derived, or drawn at random). `multiple`: the value
    must divide by it.
    """

    name: str
    default: Any
    kind: type
    low: Optional[float] = None
    high: Optional[float] = None
    choices: tuple[str, ...] = ()
    optional: bool = False
    multiple: int = 1
    help: str = ""


_SIDE = f"pixels; left out: {DEFAULT_SIZE}, or from the input image (docs/inputs.md)"
INPUTS: tuple[Spec, ...] = (
    Spec("prompt", DEFAULT_PROMPT, str, high=MAX_PROMPT_CHARS, help="text describing the image"),
    Spec("image", None, Path, optional=True, help="starting image: image to image instead of text to image"),
    Spec("mask", None, Path, optional=True, help="inpainting, with an image: white is redrawn, black kept"),
    Spec("prompt_strength", 0.8, float, 0.0, 1.0, help="with an image only: how much is redrawn"),
    Spec("width", None, int, MIN_SIZE, MAX_SIZE, optional=True, multiple=SIZE_MULTIPLE, help=_SIDE),
    Spec("height", None, int, MIN_SIZE, MAX_SIZE, optional=True, multiple=SIZE_MULTIPLE, help=_SIDE),
    Spec("num_images", 1, int, 1, MAX_IMAGES, help="image i uses seed + i (after the largest seed, 0)"),
    Spec("num_inference_steps", 4, int, 1, MAX_STEPS, help="denoising steps, one UNet pass each"),
    Spec("guidance_scale", 8.0, float, MIN_GUIDANCE, MAX_GUIDANCE, help="embedded guidance, w = scale - 1"),
    Spec("lcm_origin_steps", 50, int, 1, MAX_ORIGIN_STEPS, help="the teacher schedule's length"),
    Spec("seed", None, int, 0, MAX_SEED, optional=True, help="random when left out; logged"),
    Spec("clip_skip", 0, int, 0, MAX_CLIP_SKIP, help="text-encoder layers to skip from the end"),
    Spec(
        "freeu", False, bool, help="FreeU: rebalance the UNet's backbone and skip features (docs/inputs.md)"
    ),
    Spec("output_format", "png", str, choices=OUTPUT_FORMATS, help="file format"),
    Spec("output_quality", 90, int, 1, 100, help="webp and jpg quality"),
    Spec("fast_decode", False, bool, help="decode with TAESD: faster, less fine detail"),
    Spec("disable_safety_checker", False, bool, help="skip the safety checker"),
    Spec(
        "lora_weights",
        "",
        str,
        high=MAX_URL_CHARS,
        help="http(s) URL of an SD 1.5 LoRA (.safetensors, or a training's .tar); empty: none",
    ),
    Spec(
        "lora_scale",
        1.0,
        float,
        0.0,
        MAX_LORA_SCALE,
        help="strength of the LoRA (lora_weights, else trained)",
    ),
    Spec(
        "control_image",
        None,
        Path,
        optional=True,
        help="image whose canny edges guide the layout (ControlNet)",
    ),
    Spec(
        "controlnet_conditioning_scale",
        1.0,
        float,
        0.0,
        MAX_CONTROL_SCALE,
        help="control_image only: weight of the ControlNet's residuals",
    ),
    Spec(
        "control_guidance_start",
        0.0,
        float,
        0.0,
        1.0,
        help="control_image only: fraction of steps before it applies",
    ),
    Spec(
        "control_guidance_end",
        1.0,
        float,
        0.0,
        1.0,
        help="control_image only: fraction of steps after which it stops",
    ),
    Spec(
        "canny_low_threshold", 100, int, 1, 255, help="control_image only: Canny's lower hysteresis threshold"
    ),
    Spec(
        "canny_high_threshold",
        200,
        int,
        1,
        255,
        help="control_image only: Canny's upper hysteresis threshold",
    ),
    Spec("return_control_image", False, bool, help="control_image only: also return the edge map, last"),
)
# The ControlNet's settings: each at its default unless a control_image is given, and left out of a
# file's metadata at its default (files made without them keep their bytes and reproduce as before).
CONTROL_SETTINGS = (
    "controlnet_conditioning_scale",
    "control_guidance_start",
    "control_guidance_end",
    "canny_low_threshold",
    "canny_high_threshold",
    "return_control_image",
)
# Inputs a file records only away from their defaults (see Request.metadata).
OPTIONAL_IN_FILES = ("lora_weights", "lora_scale", "freeu", *CONTROL_SETTINGS)
SPECS = {spec.name: spec for spec in INPUTS}
_OMITTED = object()
DEFAULT_STRENGTH = SPECS["prompt_strength"].default


def random_seed() -> int:
    """A seed from the full 32-bit range, drawn without touching any global RNG."""
    return secrets.randbelow(MAX_SEED + 1)


def _integral(value: Any) -> Any:
    """JSON Schema counts 256.0 as an integer, so Cog passes such floats on: take them as ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def check(spec: Spec, value: Any, low: Optional[float] = None, extra: str = "") -> Any:
    """The value if `spec` allows it (None only where optional), else InputError naming the field."""
    if value is None and spec.optional:
        return None
    low = spec.low if low is None else low
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise InputError(spec.name, value, "true or false")
        return value
    if spec.choices:
        if value not in spec.choices:
            raise InputError(spec.name, value, f"one of {', '.join(spec.choices)}")
        return value
    if spec.kind is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and low <= value <= spec.high):
            raise InputError(spec.name, value, f"a number from {low} to {spec.high}")
        return float(value)
    if spec.kind is int:
        return _check_int(spec, _integral(value), low, extra)
    if spec.kind is str:
        if not isinstance(value, str) or len(value) > spec.high:
            raise InputError(spec.name, value, f"a string of at most {spec.high} characters")
        return value
    return value  # a Path: read and checked by images.load_input_image


def _check_int(spec: Spec, value: Any, low: float, extra: str) -> int:
    if spec.multiple > 1:
        allowed = f"a multiple of {spec.multiple} from {spec.low} to {spec.high}"
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= spec.high:
            raise InputError(spec.name, value, allowed)
        if value % spec.multiple:
            lower = value - value % spec.multiple
            raise InputError(spec.name, value, f"{allowed} (nearest: {lower} or {lower + spec.multiple})")
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= spec.high:
        raise InputError(spec.name, value, f"an integer from {int(low)} to {int(spec.high)}{extra}")
    return value


def output_size(image_size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """The image-to-image output size: what was asked, with missing sides from the input image.

    With neither side given, the input is scaled to fit 1024 without upscaling, unless its
    shorter side is below 256, which is then raised to 256; a side given alone keeps the
    input's aspect ratio for the other. Computed sides snap to the nearest multiple of 8
    within [256, 1024], so extreme aspect ratios are cropped by images.fit_image, never squashed.
    """
    if width is not None and height is not None:
        return width, height
    w, h = image_size
    if width is not None:
        return width, _snap(width * h / w)
    if height is not None:
        return _snap(height * w / h), height
    scale = min(1.0, MAX_SIZE / max(w, h))
    if min(w, h) * scale < MIN_SIZE:
        scale = min(MIN_SIZE / min(w, h), MAX_SIZE / max(w, h))
    return _snap(w * scale), _snap(h * scale)


def _snap(side: float) -> int:
    nearest = SIZE_MULTIPLE * math.floor(side / SIZE_MULTIPLE + 0.5)
    return min(MAX_SIZE, max(MIN_SIZE, nearest))


@dataclass(frozen=True)
class Request:
    """One validated request: everything that decides the output images and files.

    Its fields are the inputs' names, except that `image` is the fitted picture (its file's
    hash in `image_sha256`), `mask` the fitted mask in grey levels (its file's hash in
    `mask_sha256`), the safety checker is named for what it does (`safety_checker`, the
    negation of the input `disable_safety_checker`), and `compel` says whether the prompt is
    read in Compel's weighting syntax (false only for a file made before weighting existed).
    Built only by `build`.
    """

    prompt: str
    width: int
    height: int
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    lcm_origin_steps: int
    seed: int
    image: Optional[Image.Image] = field(compare=False, repr=False)  # fitted to width x height
    image_sha256: Optional[str]
    mask: Optional[Image.Image] = field(compare=False, repr=False)  # mode "L", fitted to width x height
    mask_sha256: Optional[str]
    prompt_strength: float
    clip_skip: int
    output_format: str
    output_quality: int
    safety_checker: bool
    fast_decode: bool
    lora_scale: float
    freeu: bool
    lora_weights: str
    compel: bool
    lora: Optional[lora.RequestLora]  # lora_weights' file as fetched (None: no lora_weights)
    control_image: Optional[Image.Image] = field(default=None, compare=False, repr=False)  # fitted too
    control_image_sha256: Optional[str] = None
    controlnet_conditioning_scale: float = SPECS["controlnet_conditioning_scale"].default
    control_guidance_start: float = SPECS["control_guidance_start"].default
    control_guidance_end: float = SPECS["control_guidance_end"].default
    canny_low_threshold: int = SPECS["canny_low_threshold"].default
    canny_high_threshold: int = SPECS["canny_high_threshold"].default
    return_control_image: bool = SPECS["return_control_image"].default

    @property
    def weighted(self) -> bool:
        """Whether compel encodes the prompt: read in its syntax, and weighting something."""
        return self.compel and prompts.weighting(self.prompt) is not None

    @classmethod
    def build(
        cls, prompt: Any = _OMITTED, *, compel: bool = True, lora_sha256: Optional[str] = None, **inputs: Any
    ) -> "Request":
        """Validate every input, read the input image, resolve size and seed.

        Takes INPUTS' names, the prompt also first by position; any left out takes its default.
        `compel=False` reads the prompt as plain text, as files made before weighting existed were.
        lora_weights is fetched last (from the cache, or downloaded), once every other input passed;
        `lora_sha256` (a file's record) is the sha256 its LoRA must still have.

        Raises InputError naming the first bad field. Without an image, width and height default
        to 768; with one, they follow output_size and the image is fitted to them. The control
        image is fitted the same way, to the image's size when both are given, else to its own.
        """
        if prompt is not _OMITTED:
            inputs["prompt"] = prompt
        unknown = sorted(set(inputs) - set(SPECS))
        if unknown:
            raise TypeError(f"unknown input(s) {', '.join(unknown)}: the inputs are {', '.join(SPECS)}")
        v = {spec.name: inputs.get(spec.name, spec.default) for spec in INPUTS}
        steps = check(SPECS["num_inference_steps"], v["num_inference_steps"])
        for spec in INPUTS:
            if spec.name == "lcm_origin_steps":
                v[spec.name] = check(spec, v[spec.name], steps, f" (at least num_inference_steps={steps})")
            else:
                v[spec.name] = check(spec, v[spec.name])
        if v["lora_weights"]:
            downloads.check_url(v["lora_weights"], "lora_weights")
        if compel:
            prompts.weighting(v["prompt"])  # Compel's syntax: a bad one fails here, before it is queued
        if v["seed"] is None:
            v["seed"] = random_seed()
        image, fitted, digest = v.pop("image"), None, None
        mask, fitted_mask, mask_digest = v.pop("mask"), None, None
        width, height, strength = v["width"], v["height"], v["prompt_strength"]
        if mask is not None and image is None:
            raise InputError(
                "mask",
                Path(mask).name,
                "only together with image (it marks the parts of the image to redraw): send both",
            )
        if mask is not None and v["control_image"] is not None:
            raise InputError(
                "control_image",
                Path(v["control_image"]).name,
                "not together with mask (the ControlNet is not offered for inpainting): send one of them",
            )
        control = _control(v)
        if image is None:
            if strength != DEFAULT_STRENGTH:
                raise InputError(
                    "prompt_strength", strength, "only with an image (it sets how much of the image changes)"
                )
            if control is None:
                width, height = width or DEFAULT_SIZE, height or DEFAULT_SIZE
            else:
                width, height = output_size(control.size, width, height)
        else:
            loaded, digest = _read_input(image, "image")
            width, height = output_size(loaded.size, width, height)
            fitted = images.fit_image(loaded, width, height)
            if mask is not None:
                # Read with the image's checks, fitted by the image's rule, then grey levels.
                read, mask_digest = _read_input(mask, "mask")
                fitted_mask = images.fit_image(read, width, height).convert("L")
            origin = v["lcm_origin_steps"]
            used = int(origin * strength)
            if used < steps:
                least = math.ceil(steps / origin * 100) / 100
                raise InputError(
                    "prompt_strength",
                    strength,
                    f"at least {least} with num_inference_steps={steps} and lcm_origin_steps={origin} (each "
                    f"step needs one of the lcm_origin_steps x prompt_strength = {used} timesteps left)",
                )
        if control is not None:
            v["control_image"] = images.fit_image(control, width, height)
        v.update(width=width, height=height, image=fitted, image_sha256=digest)
        v.update(mask=fitted_mask, mask_sha256=mask_digest)
        v["safety_checker"] = not v.pop("disable_safety_checker")
        fetched = None
        if v["lora_weights"]:
            from lcm import lora  # torch and diffusers: imported only by a request that needs them

            fetched = lora.fetch_request_lora(v["lora_weights"], lora_sha256)
        return cls(**v, compel=compel, lora=fetched)

    @property
    def seeds(self) -> list[int]:
        """Image i is generated from seed + i, wrapping past MAX_SEED to 0: every seed is a valid one."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def metadata(self, seed: int) -> dict[str, Any]:
        """What a file needs to be regenerated alone: this request with one image and its own seed.

        Inputs added after files were first written (OPTIONAL_IN_FILES) appear only away from their
        defaults, and the new files' hashes only with their files, so every file made without them
        keeps its bytes (from_metadata reads a missing one as its default). return_control_image
        never appears: it adds a file but changes no image.
        """
        skip = {"image", "mask", "control_image", "num_images", "safety_checker", "compel", "lora"}
        skip.add("return_control_image")
        if self.image is None:
            skip |= {"prompt_strength", "image_sha256"}
        skip |= {name for name in OPTIONAL_IN_FILES if getattr(self, name) == SPECS[name].default}
        skip |= {name for name in ("mask_sha256", "control_image_sha256") if getattr(self, name) is None}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        if self.weighted:  # only then: a file without it was read as text, made before weighting or not
            values[WEIGHTING_KEY] = "compel"
        if self.lora is not None:
            values[LORA_SHA256_KEY] = self.lora.sha256
        return {**values, "seed": seed, "model": lcm.MODEL_NAME, "version": lcm.__version__}

    @classmethod
    def from_metadata(
        cls,
        meta: dict[str, Any],
        image: Optional[str | Path] = None,
        mask: Optional[str | Path] = None,
        control_image: Optional[str | Path] = None,
    ) -> "Request":
        """The one-image request a file's metadata describes; its input files must be the same files.

        The file holds the inputs under their own names (see `metadata`); the safety checker is
        not among them, so the regenerated request runs it by default. A file's prompt is read in
        Compel's syntax only where the file says it was: a file made before weighting existed, whose
        prompt happens to contain that syntax, comes back as it was made.
        """
        wanted = _same_file("image", "input image", image, meta.get("image_sha256"))
        wanted_mask = _same_file("mask", "mask", mask, meta.get("mask_sha256"))
        wanted_control = _same_file(
            "control_image", "control image", control_image, meta.get("control_image_sha256")
        )
        files = ("image", "mask", "control_image")
        stored = {
            spec.name: meta[spec.name] for spec in INPUTS if spec.name in meta and spec.name not in files
        }
        compel = meta.get(WEIGHTING_KEY) == "compel"
        return cls.build(
            **stored,
            image=image if wanted else None,
            mask=mask if wanted_mask else None,
            control_image=control_image if wanted_control else None,
            compel=compel,
            lora_sha256=meta.get(LORA_SHA256_KEY),
        )


def _same_file(name: str, what: str, path: Optional[str | Path], wanted: Optional[str]) -> Optional[str]:
    """`wanted` (a file's recorded sha256) when `path` has it; InputError naming `name` when it does not."""
    if wanted is None:
        return None
    if path is None:
        raise InputError(name, None, f"the {what} this file was made from (sha256 {wanted})")
    found = file_sha256(path)
    if found != wanted:
        raise InputError(name, str(path), f"the {what} with sha256 {wanted}; this one is {found}")
    return wanted


def _control(v: dict[str, Any]) -> Optional[Image.Image]:
    """The loaded control image (popped from `v`, its hash put in), after the ControlNet settings' checks.

    Without a control image every setting must stay at its default; start < end and low < high
    are refused naming both fields.
    """
    path = v.pop("control_image")
    if path is None:
        changed = next((n for n in CONTROL_SETTINGS if v[n] != SPECS[n].default), None)
        if changed is not None:
            raise InputError(
                changed, v[changed], "only with a control_image (it sets how the ControlNet applies)"
            )
        return None
    start, end = v["control_guidance_start"], v["control_guidance_end"]
    if start >= end:
        raise InputError(
            "control_guidance_start",
            start,
            f"less than control_guidance_end={end} (the ControlNet applies from start to end)",
        )
    low, high = v["canny_low_threshold"], v["canny_high_threshold"]
    if low >= high:
        raise InputError(
            "canny_low_threshold", low, f"less than canny_high_threshold={high} (Canny's hysteresis band)"
        )
    loaded, v["control_image_sha256"] = _read_input(path, "control_image")
    return loaded


def _read_input(path: str | Path, field: str) -> tuple[Image.Image, str]:
    """An input image file, read with images' checks (size limits before anything is read whole),
    and its file's sha256, which files record so that reproduce can ask for the same file."""
    return images.load_input_image(path, field=field), file_sha256(path)
