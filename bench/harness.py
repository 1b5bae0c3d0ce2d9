"""Ours and the reference in one process, on the same weights and inputs, in interleaved rounds.

Ours is predict.Predictor, the path Cog serves, end to end to the files on disk. The reference is
diffusers' LatentConsistencyModelPipeline with its defaults for the device (safety checker on), its
PIL images saved as PNG with Pillow's defaults. Both stay loaded and take turns, in ABBA order, so
a machine whose load drifts (a shared box, a neighbour's test run) slows both alike and the ratio
holds; each run's memory peak is taken above what was held when it started.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import inspect
import io
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np
import torch
from compel import CompelForSD
from diffusers import (
    ControlNetModel,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
)
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

import predict
from bench import DEFAULT_WEIGHTS, report
from bench.memory import MemoryWatch, Usage, release
from bench.results import SEED, Output, Result, Run, Settings
from lcm import accel, allocator, control, images, prompts
from lcm.errors import LCMError
from lcm.generation import FREEU
from lcm.loading import (
    CONTROLNET_DIR,
    DEVICE_DTYPES,
    DEVICE_ENV,
    DTYPES,
    choose_dtype,
    dtype_name,
    pick_device,
)
from lcm.params import DEFAULT_PROMPT, SPECS, Request
from lcm.weights import WEIGHTS_ENV, check_weights

GUIDANCE_SCALE = SPECS["guidance_scale"].default
ORIGIN_STEPS = SPECS["lcm_origin_steps"].default
# The reference's dtype per device unless --reference-dtype says otherwise: diffusers' own defaults.
REFERENCE_DTYPES = {"cuda": "float16", "cpu": "float32"}
# Inpainting at strength 1: the one strength at which diffusers' pipeline and ours take the same
# timesteps at every step count (docs/inputs.md, "Inpainting"), so both make the same images.
INPAINT_STRENGTH = 1.0


def inpaint_inputs(size: int) -> tuple[Image.Image, Image.Image]:
    """The inpaint mode's input image (a noisy colour gradient) and mask (white over the centre quarter)."""
    y, x = np.mgrid[0:size, 0:size]
    noise = np.random.default_rng(0).integers(0, 40, (size, size, 3))
    photo = np.stack([x, y, (x + y) // 2], axis=-1) * 255 // (2 * size) + noise
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : size * 3 // 4, size // 4 : size * 3 // 4] = 255
    return Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)), Image.fromarray(mask)


def control_input(size: int) -> Image.Image:
    """The controlnet mode's control image: grey 16-px blocks of random (seeded) levels, whose step
    edges of every contrast give Canny work at any threshold."""
    levels = np.random.default_rng(SEED).integers(0, 256, (size // 16, size // 16), dtype=np.uint8)
    pixels = np.repeat(np.repeat(levels, 16, axis=0), 16, axis=1)
    return Image.fromarray(np.stack([pixels] * 3, axis=-1))


def _data_url(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


class Recorder:
    """Stage and per-step times of the current run, from wrapped calls and step callbacks.

    On CUDA every boundary it records synchronises the device, which perturbs timing slightly, so
    there it is switched on only in a separate profiling pass, never in the timed runs. On CPU it
    costs a clock read per boundary and stays on in the timed runs.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.active = False
        self.reset()

    def reset(self) -> None:
        self.stages: dict[str, float] = {}
        self.calls: dict[str, list[float]] = defaultdict(list)
        self.marks: list[float] = []
        self._depth = 0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def stage(self, name: str, key: Optional[str] = None) -> Iterator[None]:
        """Time the block into stage `name` (and its call list `key`); nested blocks count once, outermost."""
        if not self.active or self._depth:
            yield
            return
        start = self._now()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            elapsed = self._now() - start
            self.stages[name] = self.stages.get(name, 0.0) + elapsed
            self.calls[key or name].append(elapsed)

    def wrap(self, obj: Any, attr: str, stage: str, key: Optional[str] = None) -> None:
        """Time every call of obj.attr from now on (an instance attribute shadows the method)."""
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(stage, key):
                return fn(*args, **kwargs)

        setattr(obj, attr, timed)

    def step(self, index: int, timestep: torch.Tensor) -> None:
        """Engine.generate's on_step callback: the end time of each step."""
        if self.active:
            self.marks.append(self._now())


class Method(Protocol):
    name: str
    safety_checker: str
    dtype: str
    speed: str  # the speed settings it ran with

    def setup(self) -> None: ...
    def enter(self) -> None: ...
    def run(self) -> Output: ...
    def close(self) -> None: ...


class Ours:
    """predict.Predictor as Cog drives it: setup() once, then predict() with its own defaults."""

    name = "ours: predict()"

    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        self.settings = settings
        self.recorder = recorder
        self.safety_checker = "?"
        self.dtype = "?"
        self.speed = "?"
        self.generation: Any = None

    def setup(self) -> None:
        os.environ[WEIGHTS_ENV] = str(self.settings.weights)
        os.environ[DEVICE_ENV] = str(self.settings.device)
        self.predictor = predict.Predictor()
        self.predictor.setup()
        engine = self.predictor.engine
        self.dtype = dtype_name(engine.model.dtype)
        self.speed = engine.model.accel.describe()
        generate_batch = engine.generate_batch

        def observed(requests: list[Request], cancels: list[Any], on_step: Any = None) -> Any:
            """Engine.generate_batch as the queue calls it, keeping the Generation and timing each step."""

            def step(index: int, timestep: torch.Tensor) -> None:
                self.recorder.step(index, timestep)
                if on_step is not None:
                    on_step(index, timestep)

            (self.generation,) = generate_batch(requests, cancels, step)
            return [self.generation]

        engine.generate_batch = observed
        if engine.model.controlnet is not None:
            self.recorder.wrap(engine.model.controlnet, "forward", "controlnet", "controlnet.forward")
        self.kwargs = predict_inputs(self.settings)
        self.urls: dict[str, str] = {}  # the mode's input files, as data: URLs
        if self.settings.mode == "inpaint":
            image, mask = inpaint_inputs(self.settings.size)
            self.urls = {"image": _data_url(image), "mask": _data_url(mask)}
        elif self.settings.mode == "controlnet":
            self.urls = {"control_image": _data_url(control_input(self.settings.size))}

    def enter(self) -> None:
        """The allocator as the service leaves it: the reference's turn may have reset it. The mode's
        files are downloaded here, off the clock, as Cog downloads them before predict() runs."""
        if self.predictor.engine.model.accel.hold_memory:
            allocator.hold_freed_memory(True)
        for name, url in self.urls.items():
            self.kwargs[name] = predict.cog.types.Path.validate(url).convert()

    def run(self) -> Output:
        asyncio.run(self.predictor.predict(**self.kwargs))  # a coroutine, as Cog's event loop runs it
        generation = self.generation
        stages = dict(generation.timings)
        self.safety_checker = "on" if "safety" in stages else "off"
        return Output(
            images=list(generation.pixels),
            flagged=[bool(f) for f in getattr(generation, "nsfw", [])],
            stages=stages,
            steps=self._steps(stages),
            controlnet=list(self.recorder.calls["controlnet.forward"]),
        )

    def _steps(self, stages: dict[str, float]) -> list[float]:
        """Per-step seconds from the callback's end times; step 1 is what the unet stage leaves over."""
        marks = self.recorder.marks
        if not marks or "unet" not in stages:
            return []
        later = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        return [stages["unet"] - (marks[-1] - marks[0]), *later]

    def close(self) -> None:
        for returned in self.predictor.outputs.folders:
            shutil.rmtree(returned.folder, ignore_errors=True)
        del self.predictor, self.generation


def predict_inputs(settings: Settings) -> dict[str, Any]:
    """Every predict() input at its declared default (cog.Input wraps it), with the benchmark's own values.

    Inputs added later (a safety-checker switch, say) are then benchmarked at their defaults, as served.
    """
    parameters = list(inspect.signature(predict.Predictor.predict).parameters.values())[1:]
    defaults = {p.name: getattr(p.default, "default", p.default) for p in parameters}
    return {
        **defaults,
        "prompt": settings.prompt,
        "width": settings.size,
        "height": settings.size,
        "num_images": settings.batch,
        "num_inference_steps": settings.steps,
        "guidance_scale": GUIDANCE_SCALE,
        "lcm_origin_steps": ORIGIN_STEPS,
        "seed": settings.seed,
        "fast_decode": settings.fast_decode,
        **({"prompt_strength": INPAINT_STRENGTH} if settings.mode == "inpaint" else {}),
        "freeu": settings.freeu,
    }


class Reference:
    """diffusers' pipeline at its defaults for the device: fp16 + SDPA on CUDA, fp32 on CPU (or
    --reference-dtype), checker on.

    In the inpaint mode, StableDiffusionInpaintPipeline made from that pipeline's components.
    """

    name = "reference: diffusers"
    speed = "diffusers' defaults"

    def __init__(self, settings: Settings, recorder: Recorder) -> None:
        self.settings = settings
        self.recorder = recorder
        self.safety_checker = "?"
        self.dtype = "?"

    def setup(self) -> None:
        dtype = DTYPES[self.settings.reference_dtype]
        pipe = LatentConsistencyModelPipeline.from_pretrained(
            self.settings.weights, local_files_only=True, use_safetensors=True, dtype=dtype
        ).to(self.settings.device)
        if self.settings.mode == "inpaint":
            pipe = StableDiffusionInpaintPipeline.from_pipe(pipe)
            self.recorder.wrap(pipe.vae, "encode", "prepare")  # the image, and the masked image
            self.inpaint = inpaint_inputs(self.settings.size)
        self.edges = None
        if self.settings.mode == "controlnet":
            pipe = self._controlnet_pipeline(pipe, dtype)
        pipe.set_progress_bar_config(disable=True)
        self.dtype = dtype_name(pipe.dtype)
        self.safety_checker = (
            "on (default)" if pipe.safety_checker is not None else "off (none in checkpoint)"
        )
        wrap = self.recorder.wrap
        wrap(pipe, "encode_prompt", "text")
        wrap(pipe.unet, "forward", "unet", "unet.forward")
        if self.edges is not None:
            wrap(pipe.controlnet, "forward", "unet", "controlnet.forward")
        wrap(pipe.scheduler, "step", "unet", "scheduler.step")
        wrap(pipe.vae, "decode", "vae")
        wrap(pipe, "run_safety_checker", "safety")
        wrap(pipe.image_processor, "postprocess", "postprocess")
        if self.settings.freeu:
            pipe.enable_freeu(**FREEU)
        self.pipe = pipe
        self.out_dir = Path(tempfile.mkdtemp(prefix="lcm-bench-reference-"))

    def _controlnet_pipeline(self, pipe: LatentConsistencyModelPipeline, dtype: torch.dtype) -> Any:
        """diffusers' ControlNet pipeline on the same components and the LCM scheduler, fed the edge map
        of the control image fitted as ours fits it (OpenCV's Canny at the default thresholds)."""
        controlnet = ControlNetModel.from_pretrained(
            self.settings.weights / CONTROLNET_DIR, local_files_only=True, use_safetensors=True, dtype=dtype
        ).to(self.settings.device)
        size = self.settings.size
        fitted = images.fit_image(control_input(size), size, size)
        low, high = SPECS["canny_low_threshold"].default, SPECS["canny_high_threshold"].default
        self.edges = control.canny_edges(fitted, low, high)
        scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=ORIGIN_STEPS)
        components = {**pipe.components, "scheduler": scheduler}
        components.pop("image_encoder", None)
        return StableDiffusionControlNetPipeline(**components, controlnet=controlnet).to(self.settings.device)

    def enter(self) -> None:
        """glibc's allocator as a default process has it, whatever ours set (process-wide) in its turn."""
        allocator.hold_freed_memory(False)

    def run(self) -> Output:
        s = self.settings
        if s.mode == "inpaint":  # its scheduler's config holds the origin steps (50)
            image, mask = self.inpaint
            mode: dict[str, Any] = {"image": image, "mask_image": mask, "strength": INPAINT_STRENGTH}
        elif s.mode == "controlnet":  # its LCM scheduler holds the origin steps (_controlnet_pipeline)
            mode = {"image": self.edges}
        else:
            mode = {"original_inference_steps": ORIGIN_STEPS}
        text: dict[str, Any] = {"prompt": s.prompt}
        if prompts.weighting(s.prompt) is not None:
            with self.recorder.stage("text"):
                text = {"prompt_embeds": CompelForSD(self.pipe)(prompts.compel_text(s.prompt)).embeds}
        result = self.pipe(
            **text,
            height=s.size,
            width=s.size,
            num_inference_steps=s.steps,
            guidance_scale=GUIDANCE_SCALE,
            **mode,
            num_images_per_prompt=s.batch,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in s.seeds],
            output_type="pil",
        )
        with self.recorder.stage("encode"):
            for seed, image in zip(s.seeds, result.images, strict=True):
                image.save(self.out_dir / f"reference-{seed}.png")
        calls = self.recorder.calls
        return Output(
            images=result.images,
            flagged=[bool(f) for f in result.nsfw_content_detected or []],
            stages=dict(self.recorder.stages),
            steps=[
                sum(parts)
                for parts in zip(
                    calls["unet.forward"],
                    calls["scheduler.step"],
                    *([calls["controlnet.forward"]] if self.edges is not None else []),
                    strict=False,
                )
            ],
            controlnet=list(calls["controlnet.forward"]),
        )

    def close(self) -> None:
        shutil.rmtree(self.out_dir, ignore_errors=True)
        del self.pipe


def one_run(method: Method, recorder: Recorder, watch: MemoryWatch, profile: bool) -> Run:
    """One end-to-end run; the recorder is on only when profiling, the memory watch always."""
    method.enter()
    recorder.reset()
    recorder.active = profile
    watch.start()
    start = time.perf_counter()
    output = method.run()
    seconds = time.perf_counter() - start
    recorder.active = False
    return Run(seconds, output, watch.stop())


def rounds(
    methods: Sequence[Method], count: int, recorder: Recorder, watch: MemoryWatch, profile: bool
) -> list[list[Run]]:
    """`count` rounds of one run per method, every other round in reverse order (ABBA); runs per method."""
    runs: list[list[Run]] = [[] for _ in methods]
    for i in range(count):
        order = list(range(len(methods)))
        for j in order if i % 2 == 0 else order[::-1]:
            runs[j].append(one_run(methods[j], recorder, watch, profile))
    return runs


def warm_page_cache(weights: Path) -> None:
    """Read every weight file once, so neither setup time pays for the first read from disk."""
    for file in sorted(weights.rglob("*")):
        if file.is_file():
            with file.open("rb") as handle:
                while handle.read(64 * 2**20):
                    pass


def quiet_libraries() -> None:
    """Both loads print progress bars and the same warnings; the table is what matters."""
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def benchmark(settings: Settings) -> tuple[Result, Result]:
    """Load ours, then the reference; warm both up; time them in rounds; profile (a separate pass on CUDA)."""
    quiet_libraries()
    warm_page_cache(settings.weights)
    device = settings.device
    recorder, watch = Recorder(device), MemoryWatch(device)
    methods: list[Method] = [Ours(settings, recorder), Reference(settings, recorder)]
    loaded: list[Method] = []
    setups: list[tuple[float, Usage, Usage]] = []
    try:
        for method in methods:
            _say(f"loading {method.name}")
            release(device)
            watch.start()
            start = time.perf_counter()
            method.setup()
            seconds = time.perf_counter() - start
            served = watch.stop()  # what a server holds once set up, its allocator's freed pages too
            release(device)  # what the load holds, not garbage or freed pages the allocator kept
            setups.append((seconds, watch.stop(), served))
            loaded.append(method)
        _say(f"{settings.warmup} warm-up and {settings.runs} timed rounds of {len(methods)} runs")
        rounds(methods, settings.warmup, recorder, watch, profile=False)
        synchronising = device.type == "cuda"
        timed = rounds(methods, settings.runs, recorder, watch, profile=not synchronising)
        if synchronising:
            _say(f"{settings.runs} profiling rounds, synchronising at every stage and step")
        profiled = rounds(methods, settings.runs, recorder, watch, profile=True) if synchronising else timed
    finally:
        for method in loaded:
            method.close()
        release(device)
    ours, reference = (
        Result(m.name, m.safety_checker, m.dtype, m.speed, setup[0], setup[1], setup[2], t, p)
        for m, setup, t, p in zip(methods, setups, timed, profiled, strict=True)
    )
    return ours, reference


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def declare_size(device: torch.device, size: int, batch: int) -> None:
    """With LCM_COMPILE_SIZES unset, ours is set up for the size benchmarked wherever setup compiles
    or converts for declared sizes (LCM_COMPILE=1, OpenVINO as the runtime), as a deployment declares
    the sizes it serves; otherwise the benchmark would time the eager fallback of a 768x768 setup."""
    if os.environ.get(accel.COMPILE_SIZES_ENV):
        return
    dtype, _ = choose_dtype(device)
    if accel.declares_sizes(device, dtype):
        os.environ[accel.COMPILE_SIZES_ENV] = f"{size}x{size}x{batch}"
        _say(f"{accel.COMPILE_SIZES_ENV} unset: ours declares the size benchmarked, {size}x{size}x{batch}")


def resolve(args: argparse.Namespace) -> Settings:
    """Defaults that need torch or the disk; the request is validated by the project's own rules first."""
    device = pick_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.clients is not None and (args.freeu or args.prompt is not None or args.reference_dtype):
        raise LCMError(
            "--freeu, --prompt and --reference-dtype compare one request with the reference: "
            "not with --clients"
        )
    reference_dtype = args.reference_dtype or REFERENCE_DTYPES[device.type]
    allowed = DEVICE_DTYPES[device.type]
    if reference_dtype not in allowed:
        raise LCMError(
            f"--reference-dtype {reference_dtype!r} is not allowed on {device.type}: "
            f"use {' or '.join(allowed)}"
        )
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    Request.build(
        prompt,
        freeu=args.freeu,
        width=args.size,
        height=args.size,
        num_images=args.batch,
        num_inference_steps=args.steps,
        seed=SEED,
    )
    declare_size(device, args.size, args.batch)
    weights = args.weights
    if weights is None:
        weights = DEFAULT_WEIGHTS
        if not weights.exists():
            from lcm.synthetic import build_checkpoint

            _say(f"building a full-size synthetic checkpoint in {weights} (about 25 s)")
            build_checkpoint(weights, size="full")
    if args.mode == "controlnet" and not (weights / CONTROLNET_DIR).is_dir():
        raise LCMError(
            f"--mode controlnet needs {weights / CONTROLNET_DIR}: run scripts/download-weights --dir "
            f"{weights}, or build a synthetic checkpoint, which has one, in an empty folder "
            "(python -m lcm.synthetic)"
        )
    runs = args.runs or (5 if device.type == "cuda" else 3)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return Settings(
        device,
        args.size,
        args.steps,
        args.batch,
        check_weights(weights),
        runs,
        args.warmup,
        prompt=prompt,
        fast_decode=args.fast_decode,
        mode=args.mode,
        freeu=args.freeu,
        reference_dtype=reference_dtype,
    )


def run_cli(args: argparse.Namespace, argv: list[str]) -> int:
    """Resolve, run, print the table and the speedup line (last), append to RESULTS.md if asked."""
    try:
        settings = resolve(args)
        if args.clients is not None:
            from bench import serving

            table, speedup = serving.run(settings, args.clients, args.requests)
            print(table)
        else:
            ours, reference = benchmark(settings)
            table = report.table(settings, ours, reference)
            speedup = f"speedup_vs_reference={reference.median / ours.median:.3f}"
            print("\n".join([*report.describe(settings), "", table]))
    except LCMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.record is not None:
        command = f"python -m bench {shlex.join(argv)}".strip()
        report.append(args.record, settings, command, table, speedup, described=args.clients is None)
        _say(f"appended to {args.record}")
    print(speedup)
    return 0
