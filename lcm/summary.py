"""A request's one log line: what an operator needs (seed, size, steps, batch, device, dtype, time
per stage), in the words of the request's own inputs."""

from __future__ import annotations

from typing import Optional

from lcm import prompts
from lcm.generation import Generation
from lcm.loading import dtype_name
from lcm.model import Model
from lcm.params import Request


def line(generation: Generation, model: Model) -> str:
    """The line, written by whoever waited for the request (Cog files a line with the prediction whose
    context wrote it)."""
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
        model.device,
        dtype_name(model.dtype),
        _graphs(generation.eager, r.control_image is not None, r.freeu, r.lora is not None),
        _loras(r, model),
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


def _loras(r: Request, model: Model) -> str:
    """The log line's LoRAs: the trained one (at 1 beside a request's) and the request's, as fetched."""
    said = ""
    if model.lora is not None:
        said += f" lora={model.lora.sha256[:12]}x{1.0 if r.lora is not None else r.lora_scale:.2f}"
    if r.lora is not None:
        said += f" lora_weights={r.lora.sha256[:12]}x{r.lora_scale:.2f} ({r.lora.fetched})"
    return said


def _graphs(eager: Optional[list[str]], control: bool, freeu: bool, request_lora: bool) -> str:
    """The log line's note on compiled graphs (torch.compile's or OpenVINO's): empty without."""
    if eager is None:
        return ""
    if not eager:
        return " graphs=compiled"
    why = "not a size compiled in setup, see LCM_COMPILE_SIZES"
    if freeu and eager == ["unet"]:
        why = "FreeU runs it uncompiled"
    elif request_lora and eager == ["unet"]:
        why = "a request's LoRA runs it uncompiled"
    elif control and eager == ["unet"]:  # the VAE ran compiled, so the size was compiled
        why = "its passes with the ControlNet's residuals run eagerly"
    return f" graphs=eager({'+'.join(eager)}: {why})"
