"""One loaded model, many requests: request -> embeddings -> latents -> images -> files.

The engine owns one thread (lcm.worker) and does all its model work there: loading, warm-up and
every generation, whichever thread calls. Generation runs under torch.inference_mode, on modules
whose parameters never require grad, so nothing keeps autograd state while serving.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny, ControlNetModel, LCMScheduler
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from lcm import accel, allocator, batching, compiling, control, images, lora, prompts, safety, sampler
from lcm.errors import InputError, LCMError
from lcm.loading import (
    CONTROLNET_DIR,
    choose_dtype,
    dtype_name,
    load_controlnet,
    load_pipeline,
    load_taesd,
    pick_device,
)
from lcm.params import SPECS, Request
from lcm.weights import weights_dir
from lcm.worker import CancelFlag, Cancelled, EngineThread, Job

StepCallback = Callable[[int, torch.Tensor], None]
WARM_UP_PROMPT = "warm-up"
DTYPE_KEY = "dtype"  # in each file's metadata; files made before it ran in loading.legacy_dtype
# FreeU's scales for Stable Diffusion v1-5, as diffusers' documentation passes them to enable_freeu
# ("FreeU" in its image-quality guide, which takes each model's values from the authors' repository,
# github.com/ChenyangSi/FreeU).
FREEU = {"s1": 0.9, "s2": 0.2, "b1": 1.5, "b2": 1.6}

log = logging.getLogger("lcm")


@dataclass
class Generation:
    """What one request produced, with the time each stage took (seconds)."""

    request: Request
    pixels: np.ndarray  # (N, H, W, 3) uint8
    num_tokens: int
    nsfw: list[bool]  # all False when the safety checker did not run
    timings: dict[str, float] = field(default_factory=dict)
    eager: Optional[list[str]] = None  # with compile or OpenVINO: the modules this request ran eagerly
    batch: tuple[int, int] = (1, 1)  # the batch it ran in: requests, images (generate_batch sets it)
    edges: Optional[Image.Image] = None  # the canny edge map the ControlNet was given, with a control image
    weighted: bool = False  # the prompt was encoded by compel (Compel's weighting syntax)


@dataclass(frozen=True)
class Served:
    """A request's files and its log line, which whoever waited logs: Cog attributes a log line to a
    prediction by the context it is written in (the predict coroutine's), not by the engine thread."""

    paths: list[Path]
    summary: str


class _Clock:
    """Stage timings; on CUDA it waits for the device at stage ends only, never inside the step loop."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._last
        self._last = now


class Engine:
    """The loaded components, the device they live on, and the one thread that uses them.

    Every public method may be called from any thread: the work runs on the engine's thread,
    one request at a time, and the caller waits.
    """

    def __init__(
        self,
        pipe,
        device: torch.device,
        dtype: torch.dtype,
        path: Path,
        taesd: Optional[AutoencoderTiny] = None,
        settings: Optional[accel.Accel] = None,
        thread: Optional[EngineThread] = None,
        controlnet: Optional[ControlNetModel] = None,
    ) -> None:
        self.pipe = pipe
        self.accel = settings or accel.Accel.from_env(device, dtype, pipe.vae.config)
        self.taesd = taesd  # fast_decode's tiny decoder, when the weights directory has one
        self.controlnet = controlnet  # control_image's canny ControlNet, when the weights directory has one
        self.device = device
        self.dtype = dtype
        self.weights_dir = path
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        # StableDiffusionInpaintPipeline's mask processor, except that it does not binarize: grey is kept.
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_normalize=False,
            do_binarize=False,
            do_convert_grayscale=True,
        )
        self.control_processor = control.image_processor(self.vae_scale_factor)
        self.thread = thread or EngineThread()
        # The UNet forward and VAE decoder wrappers, torch.compile's or OpenVINO's (with their protocol).
        self.compiled: list[compiling.CompiledForShapes] = []
        self.queue = batching.Queue()  # submitted requests, until a batch takes them
        self.lora: Optional[lora.LoadedLora] = None  # trained weights on the UNet (load's `lora`)
        # FreeU's attributes exist from the start (None: off), so that the UNet looks the same before
        # compile records its guards as after any FreeU request turned them off again.
        pipe.unet.disable_freeu()
        # The same configuration however the engine was made, applied on its thread.
        self.thread.call(accel.apply, pipe, taesd, self.accel)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        device: str | None = None,
        lora_path: str | os.PathLike | None = None,
        dtype: str | None = None,
    ) -> "Engine":
        """Load from a local weights directory (default: LCM_WEIGHTS_DIR, else weights/), with the
        trained LoRA at `lora_path` (a local .safetensors, see lcm.lora.fetch) on the UNet if given,
        in `dtype` ("float32", "bfloat16", ...; default: loading.choose_dtype's choice).

        Loading, and everything after, runs on the engine's own new thread.
        """
        dev = pick_device(device)
        if accel.holds_memory(dev):  # before the thread starts, so that it allocates in the main arena
            allocator.hold_freed_memory(True)
        thread = EngineThread()
        try:
            return thread.call(cls._load, path, dev, thread, lora_path, dtype)
        except BaseException:
            thread.stop()
            raise

    @classmethod
    def _load(
        cls,
        path: str | os.PathLike | None,
        dev: torch.device,
        thread: EngineThread,
        lora_path: str | os.PathLike | None = None,
        dtype_requested: str | None = None,
    ) -> "Engine":
        start = time.perf_counter()
        resolved = weights_dir(path)
        dtype, why = choose_dtype(dev, dtype_requested)
        pipe = load_pipeline(resolved, dev, dtype)
        taesd = load_taesd(resolved, dev, dtype)
        controlnet = load_controlnet(resolved, dev, dtype)
        for module in (*pipe.components.values(), taesd, controlnet):
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        settings = accel.Accel.from_env(dev, dtype, pipe.vae.config)
        trained = None
        if lora_path is not None:
            if settings.fuse_qkv or settings.compile or settings.runtime != "torch":
                # Fused projections would bypass the LoRA on to_q/to_k/to_v; a compiled UNet would
                # recompile for every lora_scale, and on a CPU freeze the LoRA's weights into its graph;
                # a converted one would have the LoRA baked in. A fine-tuned version keeps its base's
                # environment (cog.yaml), so it is set up without them rather than refused.
                settings = replace(
                    settings, fuse_qkv=False, compile=False, cuda_graphs=False, runtime="torch"
                )
                log.warning(
                    "trained weights (a LoRA): LCM_FUSE_QKV, LCM_COMPILE and LCM_RUNTIME=openvino are off "
                    "for this model (fused projections would bypass it; a compiled UNet would recompile "
                    "per lora_scale; a converted one would bake it in)"
                )
            trained = lora.attach(pipe, lora_path)
        engine = cls(pipe, dev, dtype, resolved, taesd, settings, thread, controlnet)
        engine.lora = trained
        loaded = time.perf_counter() - start
        if settings.compile:
            log.info("compile cache: %s", compiling.load_cache(resolved, dev))
            engine.compiled = compiling.compile_modules(pipe, settings.cuda_graphs, dev)
            engine.warm_up()
        elif settings.runtime == "openvino":
            from lcm import openvino_runtime  # an optional dependency (requirements-cpu.txt)

            engine.compiled = openvino_runtime.run_modules(
                pipe, resolved, settings.compile_sizes, settings.decode_chunk
            )
        log.info(
            "loaded %s on %s (%s: %s; %s) in %.1fs, warm-up %.1fs",
            resolved,
            dev,
            dtype_name(dtype),
            why,
            settings.describe(),
            loaded,
            time.perf_counter() - start - loaded,
        )
        return engine

    def warm_up(self) -> None:
        """Compile (and record CUDA graphs) for each declared size now, then seal: no request compiles.

        A run sees every input signature of its size: the first step's latents and the later
        steps'. CUDA graph trees record on a function's second call and replay from the third.
        """
        runs = 3 if self.accel.cuda_graphs else 1
        for width, height, images_ in self.accel.compile_sizes:
            request = Request.build(
                WARM_UP_PROMPT,
                width=width,
                height=height,
                num_images=images_,
                seed=0,
                disable_safety_checker=True,
            )
            for _ in range(runs):
                self.generate_batch([request], [CancelFlag()])
        for module in self.compiled:
            module.seal()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on the engine thread, under inference mode, waiting for it."""
        return self.thread.call(_inference(fn), *args, **kwargs)

    def close(self) -> None:
        """End the engine thread once its queued work is done."""
        self.thread.stop()

    def scheduler(self, request: Request) -> LCMScheduler:
        """A fresh scheduler per request (schedulers keep step state), holding this request's timesteps.

        The input `lcm_origin_steps` (the LCM authors' name, kept by this API) is what diffusers
        calls `original_inference_steps`: the length of the teacher's schedule, whose timesteps
        the LCM steps are drawn from. With an input image (masked or not), prompt_strength keeps
        only the lower part of that schedule.
        """
        scheduler = LCMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(
            request.num_inference_steps,
            device=self.device,
            original_inference_steps=request.lcm_origin_steps,
            strength=request.prompt_strength if request.image is not None else 1.0,
        )
        return scheduler

    def check(self, request: Request) -> None:
        """The limits that depend on the loaded model rather than on the request alone."""
        layers = self.pipe.text_encoder.config.num_hidden_layers
        if request.clip_skip >= layers:
            raise InputError(
                "clip_skip", request.clip_skip, f"an integer from 0 to {layers - 1} for this model"
            )
        if self.lora is None and request.lora_scale != SPECS["lora_scale"].default:
            raise InputError(
                "lora_scale",
                request.lora_scale,
                "only with trained weights loaded (setup's weights, COG_WEIGHTS or --lora); none are",
            )
        if request.fast_decode and self.taesd is None:
            raise LCMError(
                f"fast_decode needs the TAESD decoder in {self.weights_dir / 'taesd'}, which is missing: "
                "run scripts/download-weights (it fetches madebyollin/taesd), or leave fast_decode off"
            )
        if request.control_image is not None and self.controlnet is None:
            raise LCMError(
                f"control_image needs the canny ControlNet in {self.weights_dir / CONTROLNET_DIR}, which is "
                "missing: run scripts/download-weights (it fetches lllyasviel/control_v11p_sd15_canny), or "
                "leave control_image empty"
            )
        if request.safety_checker and self.pipe.safety_checker is None:
            raise LCMError(
                "this checkpoint has no safety checker: set disable_safety_checker to run without one"
            )

    def start_latents(
        self, request: Request, scheduler: LCMScheduler, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """Pure noise for text to image; for image to image, the encoded image noised to the first timestep.

        Draws from each image's generator in diffusers' order (VAE posterior, then noise), so
        each image matches diffusers' img2img pipeline run with that image's seed alone.
        """
        if request.image is None:
            shape = (
                request.num_images,
                self.pipe.unet.config.in_channels,
                request.height // self.vae_scale_factor,
                request.width // self.vae_scale_factor,
            )
            noise = sampler.initial_noise(generators, shape, self.device, self.dtype)
            return noise * scheduler.init_noise_sigma
        clean, noise, _ = self._encode_image(request, generators)
        return self._noised(clean, noise, scheduler)

    def inpaint_start(
        self, request: Request, scheduler: LCMScheduler, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, sampler.Inpaint]:
        """A masked request's start latents and what keeps its unmasked part, as diffusers' inpainting
        pipeline (4-channel UNet) makes them.

        At prompt_strength 1 it starts from pure noise, as that pipeline does. Each generator
        then draws one more latent-sized sample, which the start discards: that pipeline encodes
        the masked image with the same generator (for a 9-channel UNet's input), so the step
        noise after it comes from the same place in the stream as there.
        """
        clean, noise, posterior = self._encode_image(request, generators)
        for g in generators:
            posterior.sample(generator=g)
        if request.prompt_strength == 1.0:
            start = noise * scheduler.init_noise_sigma
        else:
            start = self._noised(clean, noise, scheduler)
        pixels = self.mask_processor.preprocess(request.mask, height=request.height, width=request.width)
        latent_size = (request.height // self.vae_scale_factor, request.width // self.vae_scale_factor)
        mask = F.interpolate(pixels, size=latent_size).to(device=self.device, dtype=self.dtype)
        mask = mask.expand(request.num_images, -1, -1, -1)
        return start, sampler.inpaint_targets(scheduler, clean, noise, mask)

    def _encode_image(
        self, request: Request, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The input image's scaled latents sampled per image, the start noise, and the VAE posterior."""
        pipe = self.pipe
        pixels = pipe.image_processor.preprocess(request.image).to(device=self.device, dtype=pipe.vae.dtype)
        posterior = pipe.vae.encode(pixels).latent_dist  # encoded once, sampled per image
        clean = torch.cat([posterior.sample(generator=g) for g in generators]).to(self.dtype)
        clean = clean * pipe.vae.config.scaling_factor
        noise = sampler.initial_noise(generators, tuple(clean.shape), self.device, self.dtype)
        return clean, noise, posterior

    @staticmethod
    def _noised(clean: torch.Tensor, noise: torch.Tensor, scheduler: LCMScheduler) -> torch.Tensor:
        noised = scheduler.add_noise(clean, noise, scheduler.timesteps[:1].repeat(clean.shape[0]))
        return noised.contiguous()  # the VAE's channels_last output would give the UNet other strides

    def generate(
        self,
        request: Request,
        on_step: Optional[StepCallback] = None,
        cancel: Optional[CancelFlag] = None,
    ) -> Generation:
        """Every image of the request, with the safety checker's verdicts when it is on.

        Runs on the engine thread. `on_step(i, t)` is called there after each step; a set
        `cancel` flag stops the request at the next step or stage boundary with worker.Cancelled.
        Running out of device memory fails this request only: the memory is given back and the
        error says what to ask for instead.
        """
        self.check(request)
        return self.thread.call(self._generate_one, request, on_step, cancel)

    def _generate_one(
        self, request: Request, on_step: Optional[StepCallback], cancel: Optional[CancelFlag]
    ) -> Generation:
        try:
            (generation,) = self.generate_batch([request], [cancel or CancelFlag()], on_step)
        except torch.OutOfMemoryError as exc:
            raise self._out_of_memory(exc, [request]) from None
        if generation is None:
            raise Cancelled()
        return generation

    def _out_of_memory(self, exc: BaseException, requests: list[Request]) -> LCMError:
        log.warning("out of memory: %s", exc)
        self.free_memory()
        r, images_ = requests[0], sum(r.num_images for r in requests)
        return LCMError(
            f"out of {self.device.type.upper()} memory generating {images_} image(s) at "
            f"{r.width}x{r.height}: try a smaller size or fewer images"
        )

    def free_memory(self) -> None:
        """Give cached allocations back to the device after a failure."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate_batch(
        self,
        requests: list[Request],
        cancels: list[CancelFlag],
        on_step: Optional[StepCallback] = None,
    ) -> list[Optional[Generation]]:
        """Requests that share a batching.shape_key, in one set of UNet passes; on the engine thread.

        Each request keeps its own prompt embedding, its images their own CPU generators, its
        guidance its own rows of the w-embedding, and its safety setting. A request whose flag
        is set leaves the batch at the next step (None in its place); the others go on.
        """
        sizes = [r.num_images for r in requests]
        owners = [k for k, n in enumerate(sizes) for _ in range(n)]  # the request of each running row
        for module in self.compiled:
            module.eager_calls = 0
            # The compiled UNet was traced without FreeU: a FreeU batch runs it eagerly, and says so.
            module.eager_only = requests[0].freeu and module.name == "unet"
        clock = _Clock(self.device)
        pipe, first = self.pipe, requests[0]
        embeddings = [
            prompts.encode_prompt(
                pipe.tokenizer, pipe.text_encoder, r.prompt, self.device, r.clip_skip, r.compel
            )
            for r in requests
        ]
        clock.lap("text")
        scheduler = self.scheduler(first)  # the same timesteps for all: they share a shape key
        if self.lora is not None:  # the same lora_scale for all: it is in the shape key
            self.lora = lora.set_scale(pipe, self.lora, first.lora_scale)
        generators = [sampler.generators_for(r.seeds) for r in requests]
        inpaint = None
        if first.mask is not None:  # all or none of a batch: the shape key says
            made = [self.inpaint_start(r, scheduler, g) for r, g in zip(requests, generators, strict=True)]
            starts = [start for start, _ in made]
            inpaint = sampler.Inpaint(
                torch.cat([keep.mask for _, keep in made]), torch.cat([keep.kept for _, keep in made], dim=1)
            )
        else:
            starts = [self.start_latents(r, scheduler, g) for r, g in zip(requests, generators, strict=True)]
        latents = torch.cat(starts) if len(starts) > 1 else starts[0]
        edges = [
            control.canny_edges(r.control_image, r.canny_low_threshold, r.canny_high_threshold)
            if r.control_image is not None
            else None
            for r in requests
        ]
        guide = None
        if first.control_image is not None:  # all of them: they share a shape key
            guide = control.Control(
                self.controlnet,
                control.condition(self.control_processor, edges, sizes, self.device, self.dtype),
                control.step_scales(
                    len(scheduler.timesteps),
                    first.controlnet_conditioning_scale,
                    first.control_guidance_start,
                    first.control_guidance_end,
                ),
            )
        clock.lap("prepare")

        def prune() -> Optional[list[int]]:
            keep = [i for i, k in enumerate(owners) if not cancels[k].is_set()]
            if len(keep) == len(owners):
                return None
            owners[:] = [owners[i] for i in keep]
            return keep

        if first.freeu:  # the whole batch: FreeU is in the shape key
            pipe.unet.enable_freeu(**FREEU)
        try:
            denoised = sampler.sample(
                pipe.unet,
                scheduler,
                _rows([e.embeds for e in embeddings], sizes),
                latents,
                [r.guidance_scale for r in requests for _ in range(r.num_images)],
                [g for per_request in generators for g in per_request],
                on_step,
                planned=self.accel.planned_step,
                prune=prune,
                inpaint=inpaint,
                control=guide,
            )
        finally:
            pipe.unet.disable_freeu()
        kept = prune()  # flags set during the last step: decode nothing for them
        if kept is not None:
            denoised = denoised[kept]
        clock.lap("unet")
        pixels = np.zeros((0, first.height, first.width, 3), dtype=np.uint8)
        if owners:
            if first.fast_decode:  # TAESD is small: the whole batch in one pass
                pixels = images.decode(self.taesd, denoised, chunk=len(owners))
            else:
                pixels = images.decode(pipe.vae, denoised, chunk=self.accel.decode_chunk)
        clock.lap("vae")
        nsfw = [False] * len(owners)
        checked = [i for i, k in enumerate(owners) if requests[k].safety_checker]
        if checked:
            verdicts = safety.flag_nsfw(
                pipe.feature_extractor, pipe.safety_checker, pixels[checked], self.device
            )
            for i, verdict in zip(checked, verdicts, strict=True):
                nsfw[i] = verdict
            clock.lap("safety")
        eager = [m.name for m in self.compiled if m.eager_calls] if self.compiled else None
        batch = (len(requests), sum(sizes))
        results: list[Optional[Generation]] = []
        for k, (request, embedding) in enumerate(zip(requests, embeddings, strict=True)):
            rows = [i for i, owner in enumerate(owners) if owner == k]
            results.append(
                Generation(
                    request,
                    pixels[rows],
                    embedding.num_tokens,
                    [nsfw[i] for i in rows],
                    dict(clock.timings),
                    eager,
                    batch,
                    edges[k],
                    embedding.weighted,
                )
                if rows
                else None
            )
        return results

    def submit(self, request: Request, out_dir: str | os.PathLike) -> Job[Served]:
        """Queue the request's files for the engine; returns at once with its Job.

        `job.result()` (or `await job.outcome()`) gives the files and log line, or re-raises the request's
        error; `job.cancel()` stops it at the next step or stage boundary, and a cancelled
        request leaves no files. Requests queued meanwhile that fit the same passes are served
        together (lcm.batching), within the device's batch budget.
        """
        self.check(request)
        job: Job[Served] = Job()
        self.queue.put(batching.Pending(request, Path(out_dir), job))
        self.thread.submit(self._serve_queue)  # finds its request already served when batched earlier
        return job

    def generate_files(self, request: Request, out_dir: str | os.PathLike) -> list[Path]:
        """submit() and wait, then log the request's line; interrupted while waiting (Ctrl-C), the
        request is cancelled first."""
        job = self.submit(request, out_dir)
        try:
            served = job.result()
        except BaseException:
            job.cancel_and_wait()
            raise
        log.info("%s", served.summary)
        return served.paths

    def _shape_key(self, item: batching.Pending) -> Any:
        windows, _ = prompts.count_windows(self.pipe.tokenizer, item.request.prompt, item.request.compel)
        return batching.shape_key(item.request, windows)

    def _serve_queue(self, _flag: CancelFlag) -> None:
        """On the engine thread: the next batch from the queue (nothing if it was served already)."""
        items = []
        for item in self.queue.take(self._shape_key, self.accel.batch_pixels):
            if item.job.cancel_flag.is_set():
                item.job.settle(error=Cancelled())
            else:
                items.append(item)
        if items:
            self._serve(items)

    def _serve(self, items: list[batching.Pending]) -> None:
        """Generate the batch, then write and settle each request on its own: one failing fails alone."""
        requests = [item.request for item in items]
        try:
            generations = self.generate_batch(requests, [item.job.cancel_flag for item in items])
        except BaseException as exc:
            if len(items) > 1:  # whatever broke the batch (memory, say): each request alone
                log.warning("a batch of %d requests failed (%s): serving each alone", len(items), exc)
                self.free_memory()
                for item in items:
                    self._serve([item])
                return
            if isinstance(exc, torch.OutOfMemoryError):
                exc = self._out_of_memory(exc, requests)
            items[0].job.settle(error=exc)
            return
        for item, generation in zip(items, generations, strict=True):
            try:
                if generation is None:
                    raise Cancelled()
                item.job.settle(self._write_files(generation, item.out_dir, item.job.cancel_flag))
            except BaseException as exc:  # this request's own failure: every image flagged, say
                item.job.settle(error=exc)

    def _write_files(self, generation: Generation, out_dir: Path, cancel: CancelFlag) -> Served:
        """Leave out flagged images, write the rest in parallel; the files and the request's line.

        Raises LCMError when the safety checker flags every image, so a request never
        silently returns nothing. Cancelled or failed while writing, it removes what it wrote.
        """
        request = generation.request
        cancel.check()
        start = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [
            (s, p)
            for s, p, bad in zip(request.seeds, generation.pixels, generation.nsfw, strict=True)
            if not bad
        ]
        written: list[Path] = []

        def write(item: tuple[int, np.ndarray]) -> Path:
            seed, pixels = item
            cancel.check()
            stem = out_dir / f"lcm-{seed}"
            path = images.save_image(
                pixels, stem, request.output_format, request.output_quality, self.file_metadata(request, seed)
            )
            written.append(path)
            return path

        try:
            with ThreadPoolExecutor(max_workers=max(1, min(len(kept), os.cpu_count() or 1))) as pool:
                paths = list(pool.map(write, kept))
            if request.return_control_image and kept and generation.edges is not None:
                paths.append(
                    images.save_control_image(generation.edges, out_dir / f"lcm-{request.seed}-control")
                )
                written.append(paths[-1])
            cancel.check()
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        generation.timings["encode"] = time.perf_counter() - start
        summary = self.summary(generation)
        if not kept:
            log.info("%s", summary)  # the server's log, as the prediction fails without it
            raise LCMError(
                f"the safety checker flagged all {request.num_images} image(s) as possibly NSFW, so none is "
                "returned: try another seed or prompt"
            )
        return Served(paths, summary)

    def file_metadata(self, request: Request, seed: int) -> dict[str, Any]:
        """The request's metadata, the dtype the models ran in, and the LoRA's sha256 when one is
        loaded: reproduce needs both again."""
        meta = request.metadata(seed)
        meta[DTYPE_KEY] = dtype_name(self.dtype)
        if self.lora is not None:
            meta["lora_sha256"] = self.lora.sha256
        return meta

    def summary(self, generation: Generation) -> str:
        """One line an operator can act on: seed, size, steps, batch, device, dtype, time per stage."""
        r = generation.request
        stages = " ".join(f"{k}={v:.3f}s" for k, v in generation.timings.items())
        return (
            "seed=%d images=%d size=%dx%d steps=%d guidance=%.2f origin_steps=%d tokens=%d clip_skip=%d "
            "weighting=%s freeu=%s mode=%s%s decoder=%s format=%s quality=%d flagged=%s "
            "batch=%drequests/%dimages device=%s dtype=%s%s%s %s"
        ) % (
            r.seed,
            r.num_images,
            r.width,
            r.height,
            r.num_inference_steps,
            r.guidance_scale,
            r.lcm_origin_steps,
            generation.num_tokens,
            r.clip_skip,
            _weighting(generation),
            "on" if r.freeu else "off",
            _mode(r),
            _control_note(r),
            "taesd" if r.fast_decode else "vae",
            r.output_format,
            r.output_quality,
            sum(generation.nsfw) if r.safety_checker else "off",
            *generation.batch,
            self.device,
            dtype_name(self.dtype),
            _graphs(generation.eager, r.control_image is not None, r.freeu),
            f" lora={self.lora.sha256[:12]}x{r.lora_scale:.2f}" if self.lora is not None else "",
            stages,
        )


def _mode(r: Request) -> str:
    """The log line's mode: text to image, image to image or inpainting, with the strength."""
    if r.image is None:
        return "txt2img"
    return f"{'inpaint' if r.mask is not None else 'img2img'} strength={r.prompt_strength:.2f}"


def _control_note(r: Request) -> str:
    """The log line's note on the ControlNet: empty without a control image."""
    if r.control_image is None:
        return ""
    return (
        f" control=canny scale={r.controlnet_conditioning_scale:.2f} start={r.control_guidance_start:.2f} "
        f"end={r.control_guidance_end:.2f} thresholds={r.canny_low_threshold}/{r.canny_high_threshold}"
        + (" edges=returned" if r.return_control_image else "")
    )


def _weighting(generation: Generation) -> str:
    """The log line's word on how the prompt was read."""
    if generation.weighted:
        return "compel"
    if not generation.request.compel:  # reproducing a file that records no weighting
        return "off(file without prompt_weighting)"
    return "text(nested>16)" if prompts.too_deep(generation.request.prompt) else "none"


def _graphs(eager: Optional[list[str]], control: bool, freeu: bool) -> str:
    """The log line's note on compiled graphs (torch.compile's or OpenVINO's): empty without."""
    if eager is None:
        return ""
    if not eager:
        return " graphs=compiled"
    why = "not a size compiled in setup, see LCM_COMPILE_SIZES"
    if freeu and eager == ["unet"]:
        why = "FreeU runs it uncompiled"
    elif control and eager == ["unet"]:  # the VAE ran compiled, so the size was compiled
        why = "its passes with the ControlNet's residuals run eagerly"
    return f" graphs=eager({'+'.join(eager)}: {why})"


def _rows(embeds: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Each request's prompt embedding repeated for its images, the requests one after another."""
    if len(embeds) == 1:
        return embeds[0]  # the sampler expands it without a copy
    return torch.cat([e.expand(n, -1, -1) for e, n in zip(embeds, sizes, strict=True)])


def _inference(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run
