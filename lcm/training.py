"""Latent Consistency Fine-tuning (LCF): a LoRA on the UNet, trained on the user's captioned images.

LCF (Luo et al. 2023, arXiv 2310.04378, section 4.4 and the LCF pseudo-code in its appendix) is
consistency training in the VAE's latent space, started from the pretrained LCM, with no teacher
diffusion model. For a training latent z and its caption c, one step draws a skipping-step index n,
a guidance scale w and one Gaussian noise eps, noises z to t_{n+k} and to t_n with that same eps,
and pulls the model's consistency output at t_{n+k} towards a target network's output at t_n. The
target is an exponential moving average (EMA) of the trained weights and takes no gradient.

What is trained is a LoRA on the UNet (peft, as diffusers' LoRA training scripts attach it with
`unet.add_adapter`); the VAE and the text encoder stay frozen, so each image is encoded once and
each caption embedded once before the loop. The EMA target is the EMA of the LoRA weights alone:
the base weights never change, so "EMA of the whole network" and "base weights + EMA of the LoRA"
are the same network. A second, gradient-free copy of the LoRA tensors holds it; for the target's
pass its values are swapped into the LoRA layers and back.

Constants, and where they come from:
- SKIP_INTERVAL k = 20 on the 1000 training timesteps, i.e. a 50-step schedule (the LCM paper's
  skipping-step value; diffusers' LCM training scripts: num_ddim_timesteps=50). It is also the
  `lcm_origin_steps` default the model was distilled with.
- EMA_RATE mu = 0.95 (the paper's EMA rate for the target network).
- GUIDANCE range: the paper's w in [2, 14], with w the classifier-free weight in
  eps = (1 + w) eps_c - w eps_u; this service's guidance_scale is w + 1 (docs/inputs.md, "Guidance
  scale"), so 3 to 15.
- HUBER_C = 0.001: the pseudo-Huber loss sqrt(d^2 + c^2) - c of diffusers' LCM/LCM-LoRA training
  scripts (`--huber_c` default).
- Boundary scalings c_skip, c_out: the scheduler's own (`get_scalings_for_boundary_condition_discrete`,
  its config's timestep_scaling 10, as the scripts' `timestep_scaling_factor`).
- AdamW (torch defaults but the learning rate) and gradient clipping at norm 1.0 (diffusers'
  scripts' `--max_grad_norm` default).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Optional

import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import lcm
from lcm import images, prompts, sampler
from lcm.errors import InputError
from lcm.loading import load_pipeline, pick_device
from lcm.lora import INFO_FILE, WEIGHTS_FILE
from lcm.params import MAX_SEED, Spec, check, random_seed
from lcm.weights import file_sha256, weights_dir
from lcm.worker import CancelFlag

log = logging.getLogger("lcm")

SKIP_INTERVAL = 20
EMA_RATE = 0.95
GUIDANCE_MIN, GUIDANCE_MAX = 3.0, 15.0
HUBER_C = 0.001
MAX_GRAD_NORM = 1.0

# What the archive may hold: at most this many members and bytes once unpacked (read from the
# headers before anything is unpacked, then held to while reading), each image within
# images.MAX_INPUT_BYTES. 1000 images is far beyond a style set (10 to 50).
MAX_MEMBERS = 1000
MAX_UNPACKED_BYTES = 1_000_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 10_000
# Archive entries that are no one's images: macOS resource forks and Finder files.
_JUNK = ("__MACOSX/", ".DS_Store")

# The LoRA's target modules. "attention": the attention projections (diffusers' text-to-image
# LoRA script); "all": also the feed-forward, resnet convolutions, samplers and time projections
# (diffusers' LCM-LoRA distillation script's list).
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": _ATTENTION,
    "all": (
        *_ATTENTION,
        "proj_in",
        "proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "conv1",
        "conv2",
        "conv_shortcut",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
        "time_emb_proj",
    ),
}
RESOLUTIONS = (512, 768)
_ARCHIVE = (
    "a zip or tar (.tar, .tar.gz, .tar.bz2, .tar.xz) of PNG, JPEG or WebP images, each maybe with a caption"
)

# The training's inputs, declared once: train.py repeats them as literals for cog build (a test holds
# them to this table). The field names are the API's.
TRAIN_INPUTS: tuple[Spec, ...] = (
    Spec("input_images", None, Path, help=_ARCHIVE),
    Spec("caption", "", str, high=1000, help="caption of every image without its own .txt"),
    Spec("resolution", 512, int, choices=RESOLUTIONS, help="side of the square training images, pixels"),
    Spec("max_train_steps", 500, int, 1, 20000, help="optimizer steps"),
    Spec("learning_rate", 1e-4, float, 1e-6, 1e-2, help="AdamW learning rate"),
    Spec("lora_rank", 16, int, 1, 128, help="LoRA rank (alpha = rank: scale 1)"),
    Spec("lora_target", "attention", str, choices=tuple(LORA_TARGETS), help="UNet layers the LoRA adapts"),
    Spec("batch_size", 1, int, 1, 16, help="images per step"),
    Spec("seed", None, int, 0, MAX_SEED, optional=True, help="random when left out; logged"),
    Spec(
        "skip_interval", SKIP_INTERVAL, int, 1, 250, help="k: timesteps between the online and target points"
    ),
    Spec("ema_rate", EMA_RATE, float, 0.0, 0.9999, help="mu: the target network's EMA rate"),
    Spec(
        "guidance_scale_min", GUIDANCE_MIN, float, 1.0, 20.0, help="lower end of the sampled guidance scale"
    ),
    Spec(
        "guidance_scale_max", GUIDANCE_MAX, float, 1.0, 20.0, help="upper end of the sampled guidance scale"
    ),
)
TRAIN_SPECS = {spec.name: spec for spec in TRAIN_INPUTS}


@dataclass(frozen=True)
class TrainingConfig:
    """A validated training request (everything but the archive), as training.json records it.

    `resolution` is the side in pixels. The API offers 512 and 768 (the sizes the model was made
    for); `build(..., any_resolution=True)` also takes any multiple of 8 from 64, which only tests
    use, so that the tiny checkpoint trains in seconds.
    """

    caption: str
    resolution: int
    max_train_steps: int
    learning_rate: float
    lora_rank: int
    lora_target: str
    batch_size: int
    seed: int
    skip_interval: int
    ema_rate: float
    guidance_scale_min: float
    guidance_scale_max: float

    @classmethod
    def build(cls, any_resolution: bool = False, **inputs: Any) -> "TrainingConfig":
        """Validate TRAIN_INPUTS' values (all but input_images), naming the first bad field."""
        unknown = sorted(set(inputs) - set(TRAIN_SPECS) - {"input_images"})
        if unknown:
            raise TypeError(f"unknown input(s) {', '.join(unknown)}")
        v: dict[str, Any] = {}
        for spec in TRAIN_INPUTS[1:]:
            value = inputs.get(spec.name, spec.default)
            if spec.name == "resolution" and any_resolution:
                if isinstance(value, bool) or not isinstance(value, int) or value < 64 or value % 8:
                    raise InputError("resolution", value, "a multiple of 8 from 64")
            else:
                value = check(spec, value)
            v[spec.name] = value
        v["resolution"] = int(v["resolution"])
        if v["seed"] is None:
            v["seed"] = random_seed()
        if v["guidance_scale_min"] > v["guidance_scale_max"]:
            raise InputError(
                "guidance_scale_min",
                v["guidance_scale_min"],
                f"at most guidance_scale_max={v['guidance_scale_max']}",
            )
        return cls(**v)


@dataclass(frozen=True)
class Example:
    """One training image from the archive, fitted to the training size, and its caption."""

    name: str
    image: Any  # PIL.Image.Image
    caption: str


def _bad(archive: Path, problem: str) -> InputError:
    return InputError("input_images", archive.name, f"{_ARCHIVE}; {problem}")


def _members(archive: Path) -> Iterator[tuple[str, int, Callable[[], io.BufferedIOBase]]]:
    """(name, unpacked size, opener) for each regular file of the zip or tar, after checking the lot."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            _check_headers(archive, [(i.filename, i.file_size) for i in infos])
            for info in infos:
                yield info.filename, info.file_size, lambda info=info: zf.open(info)
        return
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _bad(archive, "this file is neither a zip nor a tar archive") from exc
    with tf:
        try:
            entries = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _bad(archive, f"the archive is damaged ({exc})") from exc
        for entry in entries:
            if not (entry.isfile() or entry.isdir()):
                raise _bad(archive, f"{entry.name!r} is a link or device; only files are allowed")
        files = [e for e in entries if e.isfile()]
        _check_headers(archive, [(e.name, e.size) for e in files])
        for entry in files:
            yield entry.name, entry.size, lambda entry=entry: tf.extractfile(entry)


def _check_headers(archive: Path, entries: list[tuple[str, int]]) -> None:
    """Refuse bombs and path tricks from the headers, before anything is unpacked."""
    if len(entries) > MAX_MEMBERS:
        raise _bad(archive, f"at most {MAX_MEMBERS} files; this one has {len(entries)}")
    total = sum(size for _, size in entries)
    if total > MAX_UNPACKED_BYTES:
        raise _bad(
            archive,
            f"at most {MAX_UNPACKED_BYTES // 1_000_000} MB unpacked; this one is {total / 1e6:.0f} MB",
        )
    for name, _ in entries:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
            raise _bad(archive, f"{name!r} points outside the archive")


def _read(opener: Callable[[], io.BufferedIOBase], limit: int) -> bytes:
    """A member's bytes, never more than `limit` whatever its header claimed."""
    with opener() as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise OSError("larger than its header says")
    return data


def read_archive(archive: str | os.PathLike, caption: str, resolution: int) -> list[Example]:
    """Every image of the archive with its caption, checked as predict checks an input image.

    A .txt beside an image (same path, other suffix) is its caption, else `caption`. Folders are
    allowed; macOS's __MACOSX/ and .DS_Store entries are skipped; any other file, an image that is
    not a sane PNG, JPEG or WebP, an image without a caption or an archive without images fails
    with InputError naming input_images and the member.
    """
    archive = Path(archive)
    pictures: dict[str, tuple[str, bytes]] = {}  # name: (its path without the suffix, its bytes)
    captions: dict[str, str] = {}
    for name, size, opener in _members(archive):
        if any(part in name for part in _JUNK) or PurePosixPath(name).name.startswith("._"):
            continue
        suffix = PurePosixPath(name).suffix.lower()
        stem = name[: len(name) - len(suffix)]
        limit = MAX_CAPTION_BYTES if suffix == CAPTION_SUFFIX else images.MAX_INPUT_BYTES
        if suffix not in (*IMAGE_SUFFIXES, CAPTION_SUFFIX):
            raise _bad(archive, f"{name!r} is neither an image (.png, .jpg, .jpeg, .webp) nor a .txt caption")
        if size > limit:
            raise _bad(archive, f"{name!r} is {size / 1e6:.1f} MB; at most {limit / 1e6:g} MB")
        try:
            data = _read(opener, limit)
        except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise _bad(archive, f"{name!r} cannot be read ({exc})") from exc
        if suffix == CAPTION_SUFFIX:
            try:
                captions[stem] = data.decode("utf-8-sig").strip()
            except UnicodeDecodeError as exc:
                raise _bad(archive, f"{name!r} is not UTF-8 text") from exc
        else:
            pictures[name] = stem, data
    if not pictures:
        raise _bad(archive, "this archive holds no image")
    examples = []
    with tempfile.TemporaryDirectory(prefix="lcm-train-") as scratch:
        for name in sorted(pictures):
            stem, data = pictures[name]
            text = captions.get(stem) or caption
            if not text:
                raise InputError(
                    "caption", caption, f"a caption for {name!r}, which has no .txt beside it in the archive"
                )
            path = Path(scratch) / f"image{len(examples)}{PurePosixPath(name).suffix.lower()}"
            path.write_bytes(data)
            try:
                picture = images.load_input_image(path)
            except InputError as exc:
                raise _bad(archive, f"{name!r}: {exc.allowed.rpartition('; ')[2]}") from None
            examples.append(Example(name, images.fit_image(picture, resolution, resolution), text))
    return examples


@dataclass
class TrainingResult:
    """The archive written, the LoRA's own file and hash, the loss of every step and the speed."""

    archive: Path
    lora: Path
    sha256: str
    losses: list[float]
    steps_per_s: float


class _LoraTarget:
    """The EMA of the LoRA tensors, swapped into the UNet's LoRA layers for the target's pass."""

    def __init__(self, params: list[torch.nn.Parameter], rate: float) -> None:
        self.params = params
        self.rate = rate
        self.ema = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta (the paper's EMA update)."""
        torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - self.rate)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA values in the LoRA layers while inside; the online values back after."""
        online = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], online)


def _consistency(
    unet: torch.nn.Module,
    scheduler: LCMScheduler,
    noisy: torch.Tensor,
    t: torch.Tensor,
    w_embedding: torch.Tensor,
    embeds: torch.Tensor,
    alphas: torch.Tensor,
) -> torch.Tensor:
    """f(z_t, w, c, t) = c_skip z_t + c_out x0(z_t): the consistency output, as the sampler computes it."""
    eps = unet(noisy, t, timestep_cond=w_embedding, encoder_hidden_states=embeds, return_dict=False)[0]
    a = alphas[t].view(-1, 1, 1, 1)
    original = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
    scalings = [scheduler.get_scalings_for_boundary_condition_discrete(int(s)) for s in t]
    c_skip = torch.tensor([s[0] for s in scalings], dtype=noisy.dtype, device=noisy.device).view(-1, 1, 1, 1)
    c_out = torch.tensor([s[1] for s in scalings], dtype=noisy.dtype, device=noisy.device).view(-1, 1, 1, 1)
    return c_skip * noisy + c_out * original


def huber(a: torch.Tensor, b: torch.Tensor, c: float = HUBER_C) -> torch.Tensor:
    """The pseudo-Huber distance sqrt((a - b)^2 + c^2) - c, averaged."""
    return (((a.float() - b.float()) ** 2 + c * c).sqrt() - c).mean()


def add_lora(unet: torch.nn.Module, rank: int, target: str, seed: int) -> list[torch.nn.Parameter]:
    """Attach a fresh LoRA (alpha = rank, so its scale is 1) and return its trainable tensors.

    peft draws lora_A from torch's global generator (lora_B starts at zero, so the model starts
    unchanged): the draw runs under a forked, seeded RNG, so the same seed gives the same LoRA and
    nothing else's randomness moves.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS[target]),
            )
        )
    trainable = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in trainable:
        p.data = p.data.float()
        p.requires_grad_(True)
    return trainable


def train_lora(
    archive: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: TrainingConfig,
    weights: str | os.PathLike | None = None,
    device: str | None = None,
    cancel: Optional[CancelFlag] = None,
    report: Optional[Callable[[str], None]] = None,
) -> TrainingResult:
    """Read and check the archive, train the LoRA, write the weights archive into out_dir.

    Runs in the calling thread; a set `cancel` flag stops it between steps with worker.Cancelled.
    Reports a line per step (step, loss, its moving average, steps/s) to `report`, else the log.
    """
    cancel = cancel or CancelFlag()
    say = report or log.info
    examples = read_archive(archive, config.caption, config.resolution)
    dev = pick_device(device)
    path = weights_dir(weights)
    start = time.perf_counter()
    pipe = load_pipeline(path, dev, torch.float32)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    say(
        f"training on {len(examples)} image(s) at {config.resolution}px, {config.max_train_steps} steps, "
        f"seed {config.seed}, on {dev} ({time.perf_counter() - start:.1f}s to load)"
    )
    latents, embeds = _encode(pipe, examples, dev)
    cancel.check()
    losses, speed = _train(pipe, latents, embeds, config, dev, cancel, say)
    return _save(pipe, examples, config, losses, speed, Path(out_dir))


@torch.no_grad()
def _encode(
    pipe: LatentConsistencyModelPipeline, examples: list[Example], dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's latent (the VAE posterior's mean, scaled) and each caption's embedding, once."""
    latents, embeds = [], []
    for example in examples:
        pixels = pipe.image_processor.preprocess(example.image).to(dev)
        latents.append(pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor)
        windows, _ = prompts.token_windows(pipe.tokenizer, example.caption)
        if len(windows) > 1:
            limit = pipe.tokenizer.model_max_length - 2
            raise InputError(
                "caption", example.caption, f"at most {limit} CLIP tokens (the caption of {example.name!r})"
            )
        embeds.append(prompts.encode_prompt(pipe.tokenizer, pipe.text_encoder, example.caption, dev).embeds)
    return torch.cat(latents), torch.cat(embeds)


def _train(
    pipe: LatentConsistencyModelPipeline,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    config: TrainingConfig,
    dev: torch.device,
    cancel: CancelFlag,
    say: Callable[[str], None],
) -> tuple[list[float], float]:
    """The loop: the loss of every step, and steps per second."""
    unet, scheduler = pipe.unet, LCMScheduler.from_config(pipe.scheduler.config)
    params = add_lora(unet, config.lora_rank, config.lora_target, config.seed)
    unet.train()
    target = _LoraTarget(params, config.ema_rate)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    k = config.skip_interval
    total = scheduler.config.num_train_timesteps
    # The skipping-step schedule t_{n+k}: k - 1, 2k - 1, ..., as diffusers' DDIM solver spaces it.
    starts = torch.arange(k - 1, total, k, dtype=torch.long)
    alphas = scheduler.alphas_cumprod.to(dev)
    generator = torch.Generator("cpu").manual_seed(config.seed)
    dim = unet.config.time_cond_proj_dim
    low, high = config.guidance_scale_min, config.guidance_scale_max
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    losses: list[float] = []
    clock = time.perf_counter()
    with torch.enable_grad():
        for step in range(1, config.max_train_steps + 1):
            cancel.check()
            rows = torch.randint(len(latents), (config.batch_size,), generator=generator)
            t_start = starts[torch.randint(len(starts), (config.batch_size,), generator=generator)]
            t_end = (t_start - k).clamp(min=0)
            scales = (
                low + (high - low) * torch.rand(config.batch_size, generator=generator, dtype=torch.float64)
            ).tolist()
            noise = torch.randn(latents[rows].shape, generator=generator).to(dev)
            z, c = latents[rows.to(dev)], embeds[rows.to(dev)]
            w_embedding = sampler.guidance_embedding(scales, config.batch_size, dim).to(dev)
            t_start, t_end = t_start.to(dev), t_end.to(dev)
            with autocast:
                # The target first: its values go in and out before the online pass records its graph.
                with torch.no_grad(), target.swapped():
                    z_end = scheduler.add_noise(z, noise, t_end)
                    goal = _consistency(unet, scheduler, z_end, t_end, w_embedding, c, alphas)
                z_start = scheduler.add_noise(z, noise, t_start)
                online = _consistency(unet, scheduler, z_start, t_start, w_embedding, c, alphas)
            loss = huber(online, goal)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            target.update()
            losses.append(float(loss.detach()))
            window = losses[-20:]
            elapsed = time.perf_counter() - clock
            speed = step / elapsed if elapsed else math.inf
            say(
                f"step {step}/{config.max_train_steps} loss={losses[-1]:.5f} "
                f"avg20={sum(window) / len(window):.5f} steps/s={speed:.3f}"
            )
    unet.eval()
    return losses, config.max_train_steps / (time.perf_counter() - clock)


def _save(
    pipe: LatentConsistencyModelPipeline,
    examples: list[Example],
    config: TrainingConfig,
    losses: list[float],
    steps_per_s: float,
    out_dir: Path,
) -> TrainingResult:
    """The LoRA in diffusers' format (safetensors) and training.json, in one tar with fixed headers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(pipe.unet)  # peft key names: load_lora_weights reads them as they are
    state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in state.items()}
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=state, weight_name=WEIGHTS_FILE, safe_serialization=True
    )
    lora = out_dir / WEIGHTS_FILE
    digest = file_sha256(lora)
    info = {
        "method": "latent consistency fine-tuning (LoRA)",
        "base_model": lcm.MODEL_NAME,
        "version": lcm.__version__,
        **asdict(config),
        "huber_c": HUBER_C,
        "images": len(examples),
        "captions": sorted({e.caption for e in examples}),
        "final_loss_avg20": sum(losses[-20:]) / len(losses[-20:]),
        "lora_sha256": digest,
    }
    archive = out_dir / "lcm-lora.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (
            (WEIGHTS_FILE, lora.read_bytes()),
            (INFO_FILE, (json.dumps(info, indent=2) + "\n").encode()),
        ):
            entry = tarfile.TarInfo(name)
            entry.size, entry.mode, entry.mtime = len(data), 0o644, 0
            tf.addfile(entry, io.BytesIO(data))
    return TrainingResult(archive, lora, digest, losses, steps_per_s)
