"""Load the saved pipeline from local weights and place it on a device.

Only local safetensors are read: no hub, no pickle, no remote code. Components are loaded one by
one, each from a fixed class, so a broken file fails setup with a message that names it instead of
a library traceback; a config that does not fit its weights fails rather than leaving layers at
random init.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    ControlNetModel,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from transformers import CLIPImageProcessor, CLIPImageProcessorPil, CLIPTextModel, CLIPTokenizer  # noqa: E402

from lcm.errors import LCMError, WeightsError  # noqa: E402
from lcm.weights import (  # noqa: E402
    CONTROLNET_FILES,
    TAESD_FILES,
    WEIGHT_FILES,
    check_weights,
    config_files,
    fill_commands,
)

DEVICE_ENV = "LCM_DEVICE"
DTYPE_ENV = "LCM_DTYPE"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# What LCM_DTYPE may ask for per device: CPU float16 kernels are slow or missing.
DEVICE_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": tuple(DTYPES)}
INDEX_NAME = "model_index.json"

# The only classes a component may be, keyed as model_index.json names them: the index chooses
# among these and never makes us import anything else. save_pretrained names the feature extractor
# CLIPImageProcessorPil where torchvision is missing (transformers 5 then falls back to that class).
COMPONENT_CLASSES: dict[str, dict[tuple[str, str], type]] = {
    "unet": {("diffusers", "UNet2DConditionModel"): UNet2DConditionModel},
    "vae": {("diffusers", "AutoencoderKL"): AutoencoderKL},
    "text_encoder": {("transformers", "CLIPTextModel"): CLIPTextModel},
    "safety_checker": {("stable_diffusion", "StableDiffusionSafetyChecker"): StableDiffusionSafetyChecker},
    "tokenizer": {("transformers", "CLIPTokenizer"): CLIPTokenizer},
    "feature_extractor": {
        ("transformers", "CLIPImageProcessor"): CLIPImageProcessor,
        ("transformers", "CLIPImageProcessorPil"): CLIPImageProcessorPil,
    },
    "scheduler": {("diffusers", "LCMScheduler"): LCMScheduler},
}
TAESD_DIR = "taesd"
CONTROLNET_DIR = "controlnet-canny"
SHOWN_KEYS = 2  # weight names quoted per problem in an error message


def pick_device(requested: str | None = None) -> torch.device:
    """The requested device, else LCM_DEVICE, else CUDA when available, else CPU.

    Only cpu, cuda and cuda:N for a GPU this machine has: anything else fails here, naming where the
    value came from (the argument, or LCM_DEVICE) and what this machine allows, not later in torch.
    """
    name = requested or os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        device: Optional[torch.device] = torch.device(name)
    except RuntimeError:
        device = None
    if device is not None and (
        (device.type == "cpu" and device.index is None)
        or (device.type == "cuda" and (device.index or 0) < gpus)
    ):
        return device
    if gpus == 0:
        allowed = "cpu (CUDA is not available here)"
    else:
        allowed = "cpu, cuda or " + ("cuda:0" if gpus == 1 else f"cuda:0 to cuda:{gpus - 1}")
    raise LCMError(f"{'device' if requested else DEVICE_ENV}={name!r} is not allowed: use {allowed}")


def native_bf16() -> Optional[str]:
    """The CPU's hardware bfloat16 as torch's CPU capability checks see it: "AMX", "AVX512-BF16" or None.

    oneDNN, which runs torch's CPU convolutions and matrix products, uses these instructions for
    bfloat16 where they exist and emulates them, slower than float32, where they do not.
    """
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA; on a CPU, bf16 where it computes it in hardware (native_bf16), else fp32.

    Measured on a CPU with AMX and one with AVX512-BF16, a bf16 UNet step takes a third to half
    of the fp32 one's time (bench/RESULTS.md); fp16 CPU kernels are slow or missing.
    """
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if native_bf16() else torch.float32


def legacy_dtype(device: torch.device) -> str:
    """What a file that records no dtype was made in: every device's default before bf16 on CPUs."""
    return "float16" if device.type == "cuda" else "float32"


def choose_dtype(device: torch.device, requested: Optional[str] = None) -> tuple[torch.dtype, str]:
    """The dtype the models run in, and why: `requested` (a file's recorded dtype, say), else
    LCM_DTYPE, else default_dtype. Only dtypes that run on the device are allowed."""
    name = requested or os.environ.get(DTYPE_ENV)
    allowed = DEVICE_DTYPES[device.type]
    if not name:
        dtype = default_dtype(device)
        if device.type == "cuda":
            return dtype, "the CUDA default"
        found = native_bf16()
        return dtype, f"this CPU computes bf16 in {found}" if found else "this CPU has no AMX or AVX512-BF16"
    if name not in allowed:
        source = "dtype" if requested else DTYPE_ENV
        raise LCMError(f"{source}={name!r} is not allowed on {device.type}: use {' or '.join(allowed)}")
    why = "requested" if requested else f"{DTYPE_ENV}={name}"
    if device.type == "cpu" and DTYPES[name] == torch.bfloat16 and not native_bf16():
        why += ", emulated: this CPU has no AMX or AVX512-BF16, so it runs slower than float32"
    return DTYPES[name], why


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", as LCM_DTYPE and the files' metadata spell it."""
    return str(dtype).removeprefix("torch.")


def load_pipeline(
    weights_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype
) -> LatentConsistencyModelPipeline:
    """The diffusers pipeline from a checked local directory, on `device` in `dtype`, in eval mode.

    Cheap checks first (file names and sizes, model_index.json, every safetensors header), so a
    broken download fails in milliseconds, before any weight is read.
    """
    path = check_weights(weights_dir)
    index, classes = _read_index(path)
    for name in WEIGHT_FILES:
        check_safetensors(path, WEIGHT_FILES[name])
    configs = config_files(path)
    components = {
        name: _load_component(path, name, cls, configs[name], WEIGHT_FILES.get(name), dtype)
        for name, cls in classes.items()
    }
    pipe = LatentConsistencyModelPipeline(
        **components, requires_safety_checker=bool(index.get("requires_safety_checker", True))
    )
    pipe.register_to_config(_name_or_path=str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_taesd(
    weights_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype
) -> Optional[AutoencoderTiny]:
    """fast_decode's TAESD decoder when the weights directory has a taesd/ folder, else None.

    Optional, so its absence only disables fast_decode; but a taesd/ folder that is there must load.
    """
    return _load_optional(
        Path(weights_dir), TAESD_DIR, TAESD_FILES, AutoencoderTiny, device, dtype, "fast_decode"
    )


def load_controlnet(
    weights_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype
) -> Optional[ControlNetModel]:
    """control_image's canny ControlNet when the weights directory has a controlnet-canny/ folder, else None.

    Optional like TAESD: its absence only makes control_image unavailable; a folder that is there must load.
    """
    return _load_optional(
        Path(weights_dir), CONTROLNET_DIR, CONTROLNET_FILES, ControlNetModel, device, dtype, "control_image"
    )


def _load_optional(
    root: Path,
    folder: str,
    files: tuple[str, str],
    cls: type,
    device: torch.device,
    dtype: torch.dtype,
    feature: str,
) -> Any:
    if not (root / folder).is_dir():
        return None
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise WeightsError(
            f"{root / folder} is incomplete, missing {', '.join(missing)}: remove the folder to run "
            f"without {feature}, or fill it\n{fill_commands(root)}"
        )
    check_safetensors(root, files[1])
    model = _load_component(root, folder, cls, files[:1], files[1], dtype)
    return model.to(device)


def check_safetensors(root: Path, name: str) -> None:
    """Open one safetensors file's header: a truncated or foreign file fails here, named."""
    try:
        with safe_open(root / name, framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{name} in {root} is truncated or corrupt: {exc}\n{fill_commands(root)}") from exc


def _read_index(root: Path) -> tuple[dict[str, Any], dict[str, type]]:
    """model_index.json, checked to name for each component a class this service loads, and those classes."""
    try:
        index = json.loads((root / INDEX_NAME).read_text())
        if not isinstance(index, dict):
            raise ValueError("it is not a JSON object")
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{INDEX_NAME} in {root} is not readable: {exc}\n{fill_commands(root)}") from exc
    classes = {
        name: next((cls for key, cls in accepted.items() if index.get(name) == list(key)), None)
        for name, accepted in COMPONENT_CLASSES.items()
    }
    wrong = [
        f"  {name}: {index.get(name)!r}, expected " + " or ".join(repr(list(key)) for key in accepted)
        for name, accepted in COMPONENT_CLASSES.items()
        if classes[name] is None
    ]
    if wrong:
        raise WeightsError(
            f"{INDEX_NAME} in {root} does not describe LCM Dreamshaper v7's components:\n"
            + "\n".join(wrong)
            + f"\n{fill_commands(root)}"
        )
    return index, classes


def _load_component(
    root: Path, name: str, cls: type, configs: tuple[str, ...], weights: Optional[str], dtype: torch.dtype
) -> Any:
    """One component from its subfolder, strictly: every weight its config needs, in the right shape."""
    files = ", ".join((*configs, *([weights] if weights else [])))
    kwargs: dict[str, Any] = {"subfolder": name, "local_files_only": True}
    if weights:
        # Mismatches are collected rather than raised, so the message can name the files and shapes.
        # low_cpu_mem_usage builds a diffusers model on the meta device and puts the file's tensors in
        # place (it needs accelerate; without it diffusers first builds every module in memory, then
        # copies the file over it); transformers 5 always loads so and ignores the flag.
        kwargs.update(
            use_safetensors=True,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            low_cpu_mem_usage=True,
        )
    try:
        loaded = cls.from_pretrained(root, **kwargs)
    except MemoryError:
        raise
    except Exception as exc:  # tokenizers raises bare Exception; any failure here is a file problem
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{name} does not load from {files} in {root}: {first_line}\n{fill_commands(root)}"
        ) from exc
    if not weights:
        return loaded
    model, info = loaded
    problems = _load_problems(model, info)
    if problems:
        raise WeightsError(
            f"{configs[0]} does not match {weights} in {root}: "
            + ". ".join(problems)
            + f"\n{fill_commands(root)}"
        )
    return model


def _load_problems(model: torch.nn.Module, info: dict[str, Any]) -> list[str]:
    """What left a model partly at random init or unloaded: weights not in the file, of another shape,
    or on the meta device, where low_cpu_mem_usage leaves whatever it did not load."""
    problems = []
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:SHOWN_KEYS])
        problems.append(f"{len(missing)} weight(s) the config needs are not in the file (e.g. {shown})")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: item[0])
    if mismatched:
        shown = "; ".join(
            f"{key} is {tuple(found)} in the file, {tuple(wanted)} by the config"
            for key, found, wanted in mismatched[:SHOWN_KEYS]
        )
        problems.append(f"{len(mismatched)} weight(s) have another shape in the file (e.g. {shown})")
    reported = {*missing, *(key for key, _, _ in mismatched)}
    unloaded = [
        key
        for key, tensor in (*model.named_parameters(), *model.named_buffers())
        if tensor.is_meta and key not in reported
    ]
    if unloaded:
        shown = ", ".join(unloaded[:SHOWN_KEYS])
        problems.append(
            f"{len(unloaded)} weight(s) were never loaded, left on the meta device (e.g. {shown})"
        )
    return problems
