"""Cog adapter: typed inputs in, one call into the lcm engine, image files out."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shutil
import tempfile
import time
from typing import Callable, List, Optional

import cog.types
from cog import BasePredictor, Input, Path

from lcm import lora
from lcm.engine import Engine
from lcm.errors import InputError, LCMError
from lcm.params import Request

# Literals for cog build's static parser; tests/test_engine.py holds them to lcm.params.INPUTS.
DEFAULT_PROMPT = "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k"
OUTPUT_FORMATS = ["png", "webp", "jpg"]


log = logging.getLogger("lcm")
# How long a returned file stays on disk when Cog serves several predictions at once (seconds).
KEEP_OUTPUTS_ENV, KEEP_OUTPUTS_S = "LCM_KEEP_OUTPUTS_S", 300.0
_DOWNLOADED: set[str] = set()  # files Cog downloaded for inputs, until the prediction they are for reads them


def _recording(convert: Callable[[cog.types.URLPath], Path]) -> Callable[[cog.types.URLPath], Path]:
    def convert_and_record(self: cog.types.URLPath) -> Path:
        path = convert(self)
        _DOWNLOADED.add(os.fspath(path))
        return path

    convert_and_record.records_downloads = True  # type: ignore[attr-defined]
    return convert_and_record


# Cog downloads each URL or data: input with URLPath.convert just before predict() runs, into a
# file directly under the temp directory; any other string reaches predict() as Path(string), of
# the same type. Recording what convert made is what tells this request's download from a path.
if not getattr(cog.types.URLPath.convert, "records_downloads", False):
    cog.types.URLPath.convert = _recording(cog.types.URLPath.convert)


class Predictor(BasePredictor):
    def setup(self, weights: Optional[str] = None) -> None:
        """Load the pipeline once from local weights (LCM_WEIGHTS_DIR, else weights/), never the network.

        `weights` (COG_WEIGHTS; on Replicate, the URL of a training's output) is a trained LoRA:
        the training's archive or its .safetensors, downloaded here if a URL, put on the UNet.
        """
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.returned: collections.deque[tuple[str, float]] = collections.deque()  # (folder, when)
        self.keep_outputs_s = keep_outputs_seconds()
        lora_path = None
        if weights:
            lora_path = lora.fetch(str(weights), tempfile.mkdtemp(prefix="lcm-lora-"))
        self.engine = Engine.load(lora_path=lora_path)

    async def predict(
        self,
        prompt: str = Input(
            description="Text describing the image. Longer than 75 CLIP tokens: encoded in 75-token windows (at most 600 tokens). Compel's weighting syntax applies: word+ and word- (x1.1 and x0.9 per sign), (a phrase)1.3, .blend() and .and() (docs/inputs.md); A1111's (a phrase:1.3) is read as (a phrase)1.3.",
            default=DEFAULT_PROMPT,
        ),
        image: Optional[Path] = Input(
            description="Starting image for image-to-image (PNG, JPEG, WebP, GIF, BMP or TIFF, at most 50 megapixels and 50 MB). Empty: text-to-image.",
            default=None,
        ),
        mask: Optional[Path] = Input(
            description="Inpainting mask, only with an image: white is redrawn, black kept, grey mixes the two (same formats and limits as image; fitted to the output size as the image is). Empty: plain image-to-image.",
            default=None,
        ),
        prompt_strength: float = Input(
            description="With an image only: how much of the image (with a mask: of its white part) is redrawn, 0 to 1 (1: nearly all; with a mask, all). Default 0.8. Needs lcm_origin_steps x prompt_strength >= num_inference_steps.",
            default=0.8,
            ge=0.0,
            le=1.0,
        ),
        width: Optional[int] = Input(
            description="Output width in pixels: 256 to 1024, a multiple of 8. Empty: 768, or with an image, the image's width scaled so its longer side is at most 1024 (docs/inputs.md).",
            default=None,
            ge=256,
            le=1024,
        ),
        height: Optional[int] = Input(
            description="Output height in pixels: 256 to 1024, a multiple of 8. Empty: 768, or with an image, the image's height scaled so its longer side is at most 1024 (docs/inputs.md).",
            default=None,
            ge=256,
            le=1024,
        ),
        num_images: int = Input(
            description="Number of images: 1 to 8. Image i uses seed + i, wrapping from 4294967295 to 0. Default 1.",
            default=1,
            ge=1,
            le=8,
        ),
        num_inference_steps: int = Input(
            description="Denoising steps, one UNet pass each: 1 to 50; 2 to 8 recommended. Default 4.",
            default=4,
            ge=1,
            le=50,
        ),
        guidance_scale: float = Input(
            description="Prompt adherence, embedded in the UNet (no negative branch): 1 to 20, default 8.0. Diffusers convention: w = guidance_scale - 1 (the original LCM code fed w = guidance_scale).",
            default=8.0,
            ge=1.0,
            le=20.0,
        ),
        lcm_origin_steps: int = Input(
            description="Length of the original (teacher) schedule the LCM timesteps are drawn from: 1 to 1000, at least num_inference_steps. Default 50, as the model was distilled.",
            default=50,
            ge=1,
            le=1000,
        ),
        seed: Optional[int] = Input(
            description="Random seed, 0 to 4294967295. Empty: a random seed, which is logged.",
            default=None,
            ge=0,
            le=4294967295,
        ),
        clip_skip: int = Input(
            description="Text-encoder layers to skip from the end: 0 (use the last layer) to 11. Default 0.",
            default=0,
            ge=0,
            le=11,
        ),
        freeu: bool = Input(
            description="FreeU: in the UNet's decoder, scale the backbone features up and the skip features down (b1 1.5, b2 1.6, s1 0.9, s2 0.2: the values for SD v1-5 in diffusers' FreeU guide); no extra UNet pass. Default false.",
            default=False,
        ),
        output_format: str = Input(
            description="File format: png (lossless), webp or jpg. Default png.",
            default="png",
            choices=OUTPUT_FORMATS,
        ),
        output_quality: int = Input(
            description="Quality for webp and jpg, 1 to 100 (higher: larger, finer). Default 90. No effect on png, which is lossless.",
            default=90,
            ge=1,
            le=100,
        ),
        fast_decode: bool = Input(
            description="Decode with TAESD, a tiny distilled decoder: several times faster, with less fine detail. Default false (the full VAE).",
            default=False,
        ),
        disable_safety_checker: bool = Input(
            description="Skip the safety checker. Default false: images it flags are left out of the output, and the prediction fails if it flags them all.",
            default=False,
        ),
        lora_weights: str = Input(
            description="URL (http or https, at most 2048 characters) of an SD 1.5 LoRA to apply to this request: a .safetensors file in diffusers/peft or kohya/A1111 format (Hugging Face, Civitai), or a Replicate training's output .tar. Cached by URL and sha256, so a repeated URL is not downloaded again. Empty: no LoRA.",
            default="",
        ),
        lora_scale: float = Input(
            description="Strength of the LoRA: lora_weights' when given (a trained LoRA then stays at 1), else the trained LoRA's this model was set up with (a fine-tuned version's weights). 0 (the base model) to 1.5. Default 1. With neither only the default is allowed.",
            default=1.0,
            ge=0.0,
            le=1.5,
        ),
        control_image: Optional[Path] = Input(
            description="Image whose Canny edges guide the layout through the canny ControlNet (lllyasviel/control_v11p_sd15_canny), with or without an image; same formats and limits as image. Fitted to the output size like image; without width, height and image the output follows its size. Empty: no ControlNet.",
            default=None,
        ),
        controlnet_conditioning_scale: float = Input(
            description="control_image only: weight of the ControlNet's residuals, 0 (no effect) to 4. Default 1.0.",
            default=1.0,
            ge=0.0,
            le=4.0,
        ),
        control_guidance_start: float = Input(
            description="control_image only: fraction of the steps, 0 to 1, before which the ControlNet is off (a step counts when it lies wholly inside start..end). Default 0.0; less than control_guidance_end.",
            default=0.0,
            ge=0.0,
            le=1.0,
        ),
        control_guidance_end: float = Input(
            description="control_image only: fraction of the steps, 0 to 1, after which the ControlNet is off. Default 1.0; more than control_guidance_start.",
            default=1.0,
            ge=0.0,
            le=1.0,
        ),
        canny_low_threshold: int = Input(
            description="control_image only: Canny's lower hysteresis threshold on the gradient, 1 to 255; weaker edges are dropped, stronger ones kept where they touch a strong edge. Default 100; less than canny_high_threshold.",
            default=100,
            ge=1,
            le=255,
        ),
        canny_high_threshold: int = Input(
            description="control_image only: Canny's upper hysteresis threshold on the gradient, 1 to 255; edges this strong are always kept. Default 200; more than canny_low_threshold.",
            default=200,
            ge=1,
            le=255,
        ),
        return_control_image: bool = Input(
            description="control_image only: also return the Canny edge map the ControlNet was given, as the last file (a PNG without generation metadata). Default false.",
            default=False,
        ),
    ) -> List[Path]:
        """Generate images and return them as files, each carrying its generation parameters.

        A coroutine on Cog's event loop, so that Cog can run several at once (cog.yaml's
        concurrency); the engine's own thread does the work, batching requests that fit together,
        while this awaits. Cog cancels with asyncio.CancelledError at that await, which sets the
        request's cancel flag: the engine drops its rows at the next step.
        """
        inputs = {name: value for name, value in locals().items() if name != "self"}  # by their own names
        self._remove_sent_outputs()
        output_dir = tempfile.mkdtemp(prefix="lcm-")
        job = None
        try:
            take_downloads({"image": image, "mask": mask, "control_image": control_image})
            # Off the event loop: reading the input images and compel's parse of a long weighted
            # prompt take up to seconds, during which the other slots' predictions would stall.
            request = await asyncio.to_thread(Request.build, **inputs)
            job = self.engine.submit(request, output_dir)
            served = await job.outcome()
        except BaseException:  # failed or cancelled: leave no partial files behind
            if job is not None:
                await job.cancelled()  # the engine has let go of the directory before it goes
            shutil.rmtree(output_dir, ignore_errors=True)
            raise
        self.returned.append((output_dir, time.monotonic()))
        log.info("%s", served.summary)  # here, in this prediction's context, so that Cog files it with it
        return [Path(p) for p in served.paths]

    def _remove_sent_outputs(self) -> None:
        """Cog never deletes returned files: remove those it has surely sent, so disk use stays bounded.

        With one slot, a new prediction means the last one's answer has gone. With more, another
        slot's answer may still be on its way (an upload, say): files are kept LCM_KEEP_OUTPUTS_S
        (default KEEP_OUTPUTS_S) after their prediction returned.
        """
        slots = int(os.environ.get("COG_MAX_CONCURRENCY", "1"))
        now = time.monotonic()
        while self.returned and (slots <= 1 or now - self.returned[0][1] > self.keep_outputs_s):
            shutil.rmtree(self.returned.popleft()[0], ignore_errors=True)


def keep_outputs_seconds() -> float:
    """LCM_KEEP_OUTPUTS_S, else KEEP_OUTPUTS_S; a bad value fails setup naming it."""
    text = os.environ.get(KEEP_OUTPUTS_ENV, "")
    try:
        seconds = float(text) if text else KEEP_OUTPUTS_S
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise LCMError(f"{KEEP_OUTPUTS_ENV}={text!r} is not allowed: use a number of seconds, 0 or more")
    return seconds


def take_downloads(files: dict[str, object]) -> None:
    """Refuse any file input but a file Cog downloaded from an http(s) or data: URL, and only once.

    Cog hands any other string on as a path, which would let a caller read files on the server,
    another request's upload among them. Each download is taken off the record by the prediction
    it was made for, so no other prediction (concurrent or later) can name it: every file's record
    is taken before the first refused one (by its field's name) fails the prediction.
    """
    refused = []
    for field, path in files.items():
        if path is None:
            continue
        try:
            _DOWNLOADED.remove(os.fspath(path))
        except KeyError:
            refused.append((field, path))
    if refused:
        field, path = refused[0]
        raise InputError(field, str(path), "an http(s) or data: URL; paths on the server are not accepted")
