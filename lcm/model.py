"""The loaded model: its components, the device and dtype they run in, the speed settings applied to
them and the trained LoRA. Assembled once in setup (`load`); every stage of a request reads it.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import AutoencoderTiny, ControlNetModel, LCMScheduler

from lcm import accel, allocator, compiling, lora
from lcm.errors import InputError, LCMError
from lcm.loading import (
    CONTROLNET_DIR,
    choose_dtype,
    dtype_name,
    load_controlnet,
    load_pipeline,
    load_taesd,
)
from lcm.lora import Adapters
from lcm.params import SPECS, Request
from lcm.weights import weights_dir

log = logging.getLogger("lcm")


@dataclass
class Model:
    """One set of components on one device, shared by every mode (text to image, image to image,
    inpainting, ControlNet): nothing is loaded twice."""

    pipe: Any  # the LatentConsistencyModelPipeline whose modules every request runs
    device: torch.device
    dtype: torch.dtype
    weights_dir: Path
    accel: accel.Accel
    taesd: Optional[AutoencoderTiny] = None  # fast_decode's tiny decoder, when the weights have one
    controlnet: Optional[ControlNetModel] = None  # control_image's canny ControlNet, when they have one
    lora: Optional[lora.LoadedLora] = None  # trained weights on the UNet (load's `lora_path`)
    adapters: Adapters = field(default_factory=Adapters)  # requests' LoRAs (lora_weights)
    # torch.compile's UNet forward and VAE decoder wrappers, or OpenVINO's UNet one (the same protocol).
    compiled: list[compiling.CompiledForShapes] = field(default_factory=list)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def check(self, request: Request) -> None:
        """The limits that depend on the loaded model rather than on the request alone."""
        layers = self.pipe.text_encoder.config.num_hidden_layers
        if request.clip_skip >= layers:
            raise InputError(
                "clip_skip", request.clip_skip, f"an integer from 0 to {layers - 1} for this model"
            )
        if self.lora is None and request.lora is None and request.lora_scale != SPECS["lora_scale"].default:
            raise InputError(
                "lora_scale",
                request.lora_scale,
                "only with a LoRA: lora_weights, or trained weights loaded (setup's weights, COG_WEIGHTS or "
                "--lora); there is neither",
            )
        if request.lora is not None and self.accel.fuse_qkv:
            raise LCMError(
                "lora_weights cannot run with LCM_FUSE_QKV=1 (fused projections would bypass the LoRA's "
                "query, key and value layers): unset LCM_FUSE_QKV, or leave lora_weights empty"
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

    def free_memory(self) -> None:
        """Give cached allocations back to the device after a failure."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load(
    path: str | os.PathLike | None,
    dev: torch.device,
    lora_path: str | os.PathLike | None = None,
    dtype_requested: str | None = None,
) -> Model:
    """Load from a local weights directory (default: LCM_WEIGHTS_DIR, else weights/) in the chosen
    dtype, with the trained LoRA at `lora_path` on the UNet, the speed settings applied and, with
    LCM_COMPILE, the UNet and decoder wrapped (with LCM_RUNTIME=openvino, the UNet); compiling
    happens on first use: lcm.engine warms them up. Run it on the engine thread.
    """
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
            settings = replace(settings, fuse_qkv=False, compile=False, cuda_graphs=False, runtime="torch")
            log.warning(
                "trained weights (a LoRA): LCM_FUSE_QKV, LCM_COMPILE and LCM_RUNTIME=openvino are off "
                "for this model (fused projections would bypass it; a compiled UNet would recompile "
                "per lora_scale; a converted one would bake it in)"
            )
        trained = lora.attach(pipe, lora_path)
    model = Model(pipe, dev, dtype, resolved, settings, taesd, controlnet, trained)
    # FreeU's attributes exist from the start (None: off), so that the UNet looks the same before
    # compile records its guards as after any FreeU request turned them off again.
    pipe.unet.disable_freeu()
    accel.apply(pipe, taesd, settings)
    allocator.give_back()  # what loading freed, before a runtime converts or compiles (its docstring)
    if settings.compile:
        log.info("compile cache: %s", compiling.load_cache(resolved, dev))
        model.compiled = compiling.compile_modules(pipe, settings.cuda_graphs, dev)
    elif settings.runtime == "openvino":
        from lcm import openvino_runtime  # an optional dependency (requirements-cpu.txt)

        model.compiled = openvino_runtime.run_modules(
            pipe, resolved, settings.compile_sizes, settings.openvino_snippets, settings.fold_upsample
        )
    log.info(
        "loaded %s on %s (%s: %s; %s) in %.1fs",
        resolved,
        dev,
        dtype_name(dtype),
        why,
        settings.describe(),
        time.perf_counter() - start,
    )
    return model
