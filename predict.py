"""Cog adapter: typed inputs in, one call into the lcm engine, image files out."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Callable, Iterator, List, Optional

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
# ...and the megabytes (10^6 bytes) of them above which the oldest Cog has surely read go sooner.
# Cog needs none of them once read; the budget bounds what the time rule keeps. 1000 MB is 40 of the
# largest predictions (8.4 MP of PNG at compress level 1, about 25 MB), five times what 8 slots can
# return at once, and a small part of the disk of a machine that holds this image (CUDA, torch and
# 2.7 GB of weights), where 300 s at GPU rates (tens of 1 MB PNGs a second) would be gigabytes.
KEEP_OUTPUTS_MB_ENV, KEEP_OUTPUTS_MB = "LCM_KEEP_OUTPUTS_MB", 1000.0
# How long a file Cog downloaded for an input stays on record for the prediction it is for (seconds).
# Cog downloads a request's inputs at once (URLPath.convert, in a thread pool), then hands its
# predict() to the event loop, whose first step takes them (take_downloads) before any await: a
# record waits for the request's other downloads and that step. One older than this is from a
# request that never got there (cancelled first, or another input failed to download: then Cog
# 0.23.1 leaves this file on disk too), or one whose own downloads took longer, refused then.
DOWNLOAD_RECORD_S = 600.0


class Downloads:
    """Files Cog downloaded for inputs, each until the prediction it is for takes it, or it expires."""

    def __init__(self, keep_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.keep_s, self.clock = keep_s, clock
        self.made: collections.OrderedDict[str, float] = collections.OrderedDict()  # path: when
        self._lock = threading.Lock()  # Cog's download threads record while the event loop takes

    def record(self, path: str) -> None:
        """Cog has downloaded `path`; records no prediction took within keep_s go, with their files."""
        with self._lock:
            now = self.clock()
            while self.made and now - next(iter(self.made.values())) > self.keep_s:
                expired, _ = self.made.popitem(last=False)
                with contextlib.suppress(FileNotFoundError):  # Cog removes those of a cancelled request
                    os.unlink(expired)
            self.made.pop(path, None)
            self.made[path] = now

    def take(self, files: dict[str, object]) -> None:
        """Refuse any file input but a file Cog downloaded from an http(s) or data: URL, and only once.

        Cog hands any other string on as a path, which would let a caller read files on the server,
        another request's upload among them. Each download is taken off the record by the prediction
        it was made for, so no other prediction (concurrent or later) can name it: every file's record
        is taken before the first refused one (by its field's name) fails the prediction.
        """
        with self._lock:
            refused = [
                (field, path)
                for field, path in files.items()
                if path is not None and self.made.pop(os.fspath(path), None) is None
            ]
        if refused:
            field, path = refused[0]
            raise InputError(
                field, str(path), "an http(s) or data: URL; paths on the server are not accepted"
            )


DOWNLOADS = Downloads(DOWNLOAD_RECORD_S)
take_downloads = DOWNLOADS.take


def _recording(convert: Callable[[cog.types.URLPath], Path]) -> Callable[[cog.types.URLPath], Path]:
    def convert_and_record(self: cog.types.URLPath) -> Path:
        path = convert(self)
        DOWNLOADS.record(os.fspath(path))
        return path

    convert_and_record.records_downloads = True  # type: ignore[attr-defined]
    return convert_and_record


# Cog downloads each URL or data: input with URLPath.convert just before predict() runs, into a
# file directly under the temp directory; any other string reaches predict() as Path(string), of
# the same type. Recording what convert made is what tells this request's download from a path.
if not getattr(cog.types.URLPath.convert, "records_downloads", False):
    cog.types.URLPath.convert = _recording(cog.types.URLPath.convert)


@dataclasses.dataclass
class _Returned:
    folder: str
    when: float  # the clock's time at its return
    size: int  # bytes of its files, summed at its return


class ReturnedOutputs:
    """The folders of returned predictions, removed once Cog is done with them, so disk use stays bounded.

    Cog never deletes returned files, and it reads them after predict() has returned: the worker
    sends each Path to the server process, whose event loop reads the file when it handles that
    message and keeps the bytes (a data: URL, or an upload from memory); a file gone by then is
    logged there ("Failed to read FileOutput") and left out of an answer that still succeeds
    (coglet's crates/coglet-python/src/predictor.rs and crates/coglet/src/orchestrator.rs; shown
    for 0.23.1 in tests/test_outputs_on_disk.py).
    What tells the worker a file has been read: the server gives a slot its next prediction only
    after handling the last one's Done message, which follows its files on that slot's socket. So a
    prediction that starts while every other slot runs one (in predict()) proves every earlier
    returned folder read: were its slot one of those running, that slot's prediction started after
    it; else it is this one's. With one slot, every start proves it. Nothing else reaches the
    worker: with a slot free, what it sees is consistent with that slot's last files being unread.

    Rules, applied at each start and each return: with one slot, a start removes every returned
    folder. With more, a folder goes LCM_KEEP_OUTPUTS_S after its return (read or not: the server
    reads it as soon as it handles the message), and sooner, oldest first, while the folders' bytes
    exceed LCM_KEEP_OUTPUTS_MB, if proven read; the one returning now never is. So returned folders
    hold at most the budget, or if more, what was returned since the last proof; the folders of the
    predictions running come on top. Used from Cog's event loop thread only, as predict() runs.
    """

    def __init__(
        self, slots: int, keep_s: float, keep_bytes: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.slots, self.keep_s, self.keep_bytes, self.clock = slots, keep_s, keep_bytes, clock
        self.folders: collections.deque[_Returned] = collections.deque()  # oldest first
        self.size = 0  # bytes of self.folders
        self.read = 0  # how many of the oldest folders Cog has surely read
        self.running = 0  # predictions in predict()

    @contextlib.contextmanager
    def predicting(self) -> Iterator[None]:
        """Around one predict() call: its start may prove earlier folders read."""
        if self.running == self.slots - 1:
            self.read = len(self.folders)
        self.running += 1
        try:
            self._remove()
            yield
        finally:
            self.running -= 1

    def returned(self, folder: str, paths: list[os.PathLike]) -> None:
        """A prediction returns `paths`, all in `folder`: kept until a rule removes it."""
        size = sum(os.path.getsize(p) for p in paths)
        self.folders.append(_Returned(folder, self.clock(), size))
        self.size += size
        self._remove()

    def _remove(self) -> None:
        now, early, early_bytes, held = self.clock(), 0, 0, self.size
        while self.folders:
            oldest = self.folders[0]
            if now - oldest.when <= self.keep_s:
                if not self.read or (self.slots > 1 and self.size <= self.keep_bytes):
                    break
                if self.slots > 1:
                    early, early_bytes = early + 1, early_bytes + oldest.size
            self.folders.popleft()
            self.size -= oldest.size
            self.read = max(self.read - 1, 0)
            shutil.rmtree(oldest.folder, ignore_errors=True)
        if early:
            log.info(
                "removed %d returned output folder(s), %.3g MB, before %s=%g: returned outputs held "
                "%.3g MB, over %s=%g, and Cog had read them",
                early,
                early_bytes / 1e6,
                KEEP_OUTPUTS_ENV,
                self.keep_s,
                held / 1e6,
                KEEP_OUTPUTS_MB_ENV,
                self.keep_bytes / 1e6,
            )


class Predictor(BasePredictor):
    def setup(self, weights: Optional[str] = None) -> None:
        """Load the pipeline once from local weights (LCM_WEIGHTS_DIR, else weights/), never the network.

        `weights` (COG_WEIGHTS; on Replicate, the URL of a training's output) is a trained LoRA:
        the training's archive or its .safetensors, downloaded here if a URL, put on the UNet.
        """
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.outputs = ReturnedOutputs(
            slots=int(os.environ.get("COG_MAX_CONCURRENCY", "1")),
            keep_s=env_amount(KEEP_OUTPUTS_ENV, KEEP_OUTPUTS_S, "seconds"),
            keep_bytes=env_amount(KEEP_OUTPUTS_MB_ENV, KEEP_OUTPUTS_MB, "megabytes (10^6 bytes)") * 1e6,
        )
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
        with self.outputs.predicting():
            take_downloads({"image": image, "mask": mask, "control_image": control_image})
            # Off the event loop: reading the input images, compel's parse of a long weighted prompt
            # and fetching lora_weights take up to seconds, which would stall the other slots.
            request = await asyncio.to_thread(Request.build, **inputs)
            output_dir = tempfile.mkdtemp(prefix="lcm-")
            job = None
            try:
                job = self.engine.submit(request, output_dir)
                served = await job.outcome()
            except BaseException:  # failed or cancelled: leave no partial files behind
                if job is not None:
                    await job.cancelled()  # the engine has let go of the directory before it goes
                shutil.rmtree(output_dir, ignore_errors=True)
                raise
            self.outputs.returned(output_dir, served.paths)
        log.info("%s", served.summary)  # here, in this prediction's context, so that Cog files it with it
        return [Path(p) for p in served.paths]


def env_amount(name: str, default: float, unit: str) -> float:
    """The number in environment variable `name`, else `default`; a bad value fails setup naming it."""
    text = os.environ.get(name, "")
    try:
        amount = float(text) if text else default
    except ValueError:
        amount = -1.0
    if not 0 <= amount < float("inf"):
        raise LCMError(f"{name}={text!r} is not allowed: use a number of {unit}, 0 or more")
    return amount
