"""OpenVINO for the UNet forward on a CPU (LCM_RUNTIME=openvino); the VAE decoder stays on torch.

Why: on a 2-core AMD EPYC with AVX512-BF16 (no AMX), a full-size UNet step at 256 px took 256 ms
in OpenVINO bf16 against 561 ms in torch bf16 eager and 315 ms torch.compiled (after 73 s of
compiling). The decoder is not converted: torch's, with folded upsamplers (lcm.folding), decoded
512 px in 2702 ms against OpenVINO bf16's 3002, and the vae stage of a request took 2.47 s against
2.86 (bench/RESULTS.md, "Folded upsamplers").

Shapes: static, one compiled model per size declared in setup (LCM_COMPILE_SIZES, as for
torch.compile). On the full checkpoint (bf16, one image, best of 3) a UNet step took 245 ms at
256 px and 1114 ms at 512 px with dynamic batch, height and width, against 231 and 1000 ms static:
6% and 11% slower. Each compiled size holds its own copy of the weights in the CPU plugin's layout
(about 1.9 GB for the bf16 UNet). The model is converted once and reshaped to each size at load.
A dynamic model for the sizes not declared was measured and not built: at each new shape its
first calls compile kernels (2-3.7 s), so a request at a new size gained nothing over torch.
Where every declared size's latents are a multiple of 2 ** unet.num_upsamplers (8 for SD: any
width and height that are multiples of 64 px), each upsampler doubles its input exactly, and the
UNet is traced at such a size with its upsamplers folded as the decoder's are (LCM_FOLD_UPSAMPLE,
lcm.folding): on the 2-core EPYC a bf16 step took 1197 ms against 1241 at 512 px and 3496 against
3589 at 768 px, medians of interleaved passes (bench/RESULTS.md, "OpenVINO's UNet folded"). Other sizes
get the model traced at an odd latent size (TRACE_LATENT), so that diffusers' UNet takes its
general upsampling path (each upsampler's output size read from its skip connection), unfolded:
one saved model then serves every size. The torch UNet, which runs every request OpenVINO does
not (a LoRA's among them), keeps diffusers' upsamplers.

Attention (LCM_OPENVINO_SNIPPETS, lcm.accel): the CPU plugin fuses each attention into a Snippets
kernel by default. On the 2-core EPYC a UNet step with it took 1050-1100 ms at 512 px, against
1190 ms with attention compiled as separate MatMul and Softmax nodes; at 768 px it took 4137 ms
against 3294 (the five 9216-token self-attentions were 59% of the fused step), and at 640 px 2139
against 2012, the unfused one holding 1.2 GB more at 768 px for its materialized scores. "auto"
(the default) times a pass of each per compiled shape in the first setup (after an untimed one:
the unfused model's first pass at 768 px took 6.3 s, faulting in its buffers), keeps the faster and
records the choice beside the saved model, keyed by the CPU's name and the shape, so that later
setups skip the timing (the first setup at 768 px takes about 20 s longer).

A call it was not built for runs the torch module eagerly and counts in `eager_calls`, with the
same protocol as lcm.compiling.CompiledForShapes: another size or image count, a prompt of more
than one token window, the ControlNet's residuals, FreeU (the engine sets `eager_only`), any other
argument. Tensors cross as float32 numpy arrays (numpy has no bf16) and come back in the caller's
dtype; OpenVINO computes in bf16 where the module is bf16 (INFERENCE_PRECISION_HINT), else in f32.

Cache: converting takes 15 s for the full UNet, so setup saves the converted model with
openvino.save_model in `<weights>/openvino/<key>/` (or under LCM_OPENVINO_CACHE; DEFAULT_CACHE
where the weights directory is read-only), and a later setup loads it. The key names the module
and its dtype, and hashes its weight and config files' identity (lcm.weights.file_identity),
OpenVINO's and diffusers' versions and the shapes mode. OpenVINO's own CACHE_DIR of compiled
blobs is not used: on the full checkpoint at 256 px (bf16) it raised setup's peak resident memory
from 8.56 GB to 10.09 GB, above the fp32 torch engine's 8.64 GB, to save about 5 s of a setup
that loads from the cache (bench/RESULTS.md, "OpenVINO as the CPU default").
Memory: a model loaded from the cache needs none of the torch UNet's weights, so only a conversion
copies them contiguous and folds them (1.7 GB in bf16). The plugin compiles its own copy of the
weights and keeps the saved model.bin mapped, reading back only the constants it uses in place (8.7
of 1,770 MB for the full bf16 UNet): setup drops the file's resident pages once compiled
(lcm.allocator.drop_mapped). With both, on the full checkpoint at 512 px, what the process held
after setup fell from 8.8 to 5.9 GB (6.8 after requests), and its peak through setup and four
requests from 8.9 to 7.7 GB (bench/RESULTS.md, "Setup's garbage").
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import diffusers
import numpy as np
import openvino as ov
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from lcm import allocator, folding
from lcm.accel import SNIPPETS_ENV
from lcm.errors import LCMError
from lcm.weights import WEIGHT_FILES, file_identity

log = logging.getLogger("lcm")

OPENVINO_CACHE_ENV = "LCM_OPENVINO_CACHE"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "openvino"
CACHE_DIR = "openvino"  # in the weights directory
MODEL_FILE = "model.xml"  # in each key's directory, with WEIGHTS_FILE
WEIGHTS_FILE = "model.bin"  # the name openvino.save_model gives the weights beside MODEL_FILE
SHAPES = "static"  # the shapes mode, in the key: converted generally, reshaped to each size at load
TRACE_LATENT = 9  # odd, so the traced UNet takes diffusers' general upsampling path (the docstring)
FOLDED_TRACE = 2  # a folded UNet's trace latents, in multiples of 2 ** unet.num_upsamplers
PRECISIONS = {torch.bfloat16: "bf16", torch.float32: "f32"}  # INFERENCE_PRECISION_HINT per dtype

Shape = tuple[tuple[int, ...], ...]  # each input's shape, in the order the converted model takes them
# OpenVINO's CPU plugin fuses attention into Snippets kernels by default ("on"); "off" compiles it
# as separate MatMul and Softmax nodes (SNIPPETS_MODE=DISABLE). Which is faster depends on the
# sequence length and the CPU (the docstring), so "auto" times one pass of each per shape.
SNIPPETS = {"on": {}, "off": {"SNIPPETS_MODE": "DISABLE"}}  # lcm.accel.SNIPPETS_CHOICES, less auto
CHOICES_FILE = "snippets.json"  # beside the saved model: "auto"'s choice per CPU and shape


@dataclass(frozen=True)
class _Part:
    """One module OpenVINO runs: the method it stands in for, what it takes and what it returns."""

    name: str
    method: str
    inputs: tuple[str, ...]  # the method's tensor arguments, in the converted model's order
    output: Callable[[torch.Tensor], Any]  # return_dict=True's result
    files: tuple[str, ...]  # in the weights directory: what the converted model is made from


UNET = _Part(
    "unet",
    "forward",
    ("sample", "timestep", "encoder_hidden_states", "timestep_cond"),
    lambda sample: UNet2DConditionOutput(sample=sample),
    ("unet/config.json", WEIGHT_FILES["unet"]),
)


class _Traced(torch.nn.Module):
    """The method with plain tensor arguments and one tensor out, for convert_model's trace."""

    def __init__(self, part: _Part, module: torch.nn.Module) -> None:
        super().__init__()
        self.part = part
        self.module = module

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.part.inputs, tensors, strict=True))  # by name: timestep_cond is not 4th
        return getattr(self.module, self.part.method)(**named, return_dict=False)[0]


class OpenVINOForShapes:
    """A module method run by OpenVINO for the shapes compiled in setup; every other call runs eagerly.

    CompiledForShapes' protocol, so that the engine's bookkeeping holds: only the engine thread
    calls it, `eager_calls` counts eager calls since the engine reset it, `eager_only` runs every
    call eagerly, and `seal` changes nothing (nothing is compiled after setup).
    """

    def __init__(
        self, part: _Part, eager: Callable[..., Any], requests: dict[Shape, ov.InferRequest]
    ) -> None:
        self.name = part.name
        self.part = part
        self.eager = eager
        self.requests = requests
        self.parameters = inspect.signature(eager)
        self.eager_calls = 0
        self.eager_only = False
        self.sealed = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        covered = None if self.eager_only else self._covered(args, kwargs)
        if covered is None:
            self.eager_calls += 1
            return self.eager(*args, **kwargs)
        tensors, return_dict = covered
        request = self.requests[tuple(tuple(t.shape) for t in tensors)]
        request.infer([_array(t) for t in tensors])
        out = torch.from_numpy(request.get_output_tensor(0).data).to(tensors[0].dtype, copy=True)
        return self.part.output(out) if return_dict else (out,)

    def _covered(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Optional[tuple[list[torch.Tensor], bool]]:
        """The call's tensors when a compiled model takes exactly them, and its return_dict."""
        try:
            given = dict(self.parameters.bind(*args, **kwargs).arguments)
        except TypeError:
            return None  # the eager call raises it
        return_dict = given.pop("return_dict", True)
        tensors = [given.pop(name, None) for name in self.part.inputs]
        if any(value is not None for value in given.values()):
            return None
        if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors):
            return None
        if tuple(tuple(t.shape) for t in tensors) not in self.requests:
            return None
        if any(
            t.is_floating_point() != (name != "timestep")
            for name, t in zip(self.part.inputs, tensors, strict=True)
        ):
            return None
        return tensors, return_dict

    def seal(self) -> None:
        self.sealed = True


def _array(tensor: torch.Tensor) -> np.ndarray:
    dtype = torch.float32 if tensor.is_floating_point() else torch.int64
    return np.asarray(tensor.detach().to(dtype).numpy(), order="C")  # 0-d stays 0-d


def run_modules(
    pipe: Any, weights_dir: Path, sizes: tuple[tuple[int, int, int], ...], snippets: str, fold: bool
) -> list[OpenVINOForShapes]:
    """Stand OpenVINO in for the UNet forward at `sizes` (width, height, images).

    Converts or loads the model (with its upsamplers folded where `fold` and the sizes allow: the
    docstring), compiles it for every shape those requests give it, with attention fused or not as
    `snippets` says (SNIPPETS, or "auto"), and puts the wrapper in place as an instance attribute.
    """
    unet = pipe.unet
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    tokens = pipe.tokenizer.model_max_length  # one prompt window
    shapes = [
        (
            (images, unet.config.in_channels, height // factor, width // factor),
            (),
            (images, tokens, unet.config.cross_attention_dim),
            (images, unet.config.time_cond_proj_dim),
        )
        for width, height, images in sizes
    ]
    doubling = 2**unet.num_upsamplers
    unfit = sorted({f"{s[0][3]}x{s[0][2]}" for s in shapes if s[0][2] % doubling or s[0][3] % doubling})
    if not fold:
        folds = "upsamplers not folded (LCM_FOLD_UPSAMPLE=0)"
    elif unfit:
        folds = f"upsamplers not folded: latents {', '.join(unfit)} are not multiples of {doubling}"
    else:
        folds = "upsamplers folded"
    fold = fold and not unfit
    latent = FOLDED_TRACE * doubling if fold else TRACE_LATENT
    trace = (
        torch.randn(1, unet.config.in_channels, latent, latent, dtype=unet.dtype),
        torch.tensor(999),
        torch.randn(1, tokens, unet.config.cross_attention_dim, dtype=unet.dtype),
        torch.randn(1, unet.config.time_cond_proj_dim, dtype=unet.dtype),
    )
    wrapper = _prepare(ov.Core(), UNET, unet, weights_dir, trace, shapes, snippets, fold, folds)
    # An instance attribute shadows the method; nn.Module.__call__ (and its hooks) still runs.
    unet.forward = wrapper
    return [wrapper]


def _prepare(
    core: ov.Core,
    part: _Part,
    module: torch.nn.Module,
    weights_dir: Path,
    example: tuple[torch.Tensor, ...],
    shapes: list[Shape],
    snippets: str,
    fold: bool,
    folds: str,
) -> OpenVINOForShapes:
    if module.dtype not in PRECISIONS:
        raise LCMError(f"OpenVINO runs the {part.name} in bfloat16 or float32, not {module.dtype}")
    start = time.perf_counter()
    key = cache_key(weights_dir, part, module.dtype, example[0].shape[-1], fold)
    found = next(
        (root / key for root in cache_roots(weights_dir) if (root / key / MODEL_FILE).is_file()), None
    )
    config: dict[str, str] = {
        "INFERENCE_PRECISION_HINT": PRECISIONS[module.dtype],
        "PERFORMANCE_HINT": "LATENCY",
    }
    requests = {}
    with ExitStack() as converting:
        if found is not None:
            how = f"loaded from cache {found}"
        else:
            # A converted model reads the weights, the folded kernels too, where they are: until
            # it is compiled, or replaced by the saved one.
            converting.enter_context(_contiguous(module))
            if fold:
                converting.enter_context(folding.folded(module))
            model = _convert(part, module, example)
            how = f"converted in {time.perf_counter() - start:.1f}s"
            found = _save(model, weights_dir, key)
            how += f", saved to {found}" if found else ", not saved"
        if found is not None:  # the saved model's weights are mapped from its file, not copied
            model = core.read_model(found / MODEL_FILE)
            converting.close()  # the module's contiguous copies and folded kernels go (1.7 GB in bf16)
        converted = time.perf_counter()
        choices = _Choices(found, core.get_property("CPU", "FULL_DEVICE_NAME"))
        chosen = []
        for shape in dict.fromkeys(shapes):
            sized = model.clone()
            sized.reshape({sized.inputs[i]: ov.PartialShape(list(dims)) for i, dims in enumerate(shape)})
            requests[shape], why = _compile(core, sized, config, shape, snippets, choices)
            chosen.append(f"{'x'.join(map(str, shape[0]))}: snippets {why}")
        choices.save()
    if found is not None:  # compiled: the plugin holds its own copy (the docstring's Memory)
        dropped = allocator.drop_mapped(found / WEIGHTS_FILE)
        how += f", {WEIGHTS_FILE}'s {dropped / 1e9:.2f} GB mapping dropped from memory" if dropped else ""
    log.info(
        "openvino %s (%s): %s; %s; compiled %d shape(s) in %.1fs (%s)",
        part.name,
        PRECISIONS[module.dtype],
        how,
        folds,
        len(requests),
        time.perf_counter() - converted,
        "; ".join(chosen),
    )
    return OpenVINOForShapes(part, getattr(module, part.method), requests)


class _Choices:
    """The choices "auto" made, read from and written to CHOICES_FILE beside the saved model (when saved)."""

    def __init__(self, folder: Optional[Path], cpu: str) -> None:
        self.file = folder / CHOICES_FILE if folder is not None else None
        self.cpu = cpu
        self.changed = False
        try:
            self.known: dict[str, Any] = json.loads(self.file.read_text()) if self.file else {}
        except (OSError, ValueError):
            self.known = {}

    def key(self, shape: Shape) -> str:
        return f"{self.cpu} | {shape}"

    def get(self, shape: Shape) -> Optional[str]:
        mode = self.known.get(self.key(shape), {}).get("snippets")
        return mode if mode in SNIPPETS else None

    def put(self, shape: Shape, mode: str, ms: dict[str, float]) -> None:
        self.known[self.key(shape)] = {"snippets": mode, "ms": ms}
        self.changed = True

    def save(self) -> None:
        if not (self.changed and self.file):
            return
        try:
            partial = self.file.with_name(f"{CHOICES_FILE}.partial-{os.getpid()}")
            partial.write_text(json.dumps(self.known, indent=2, sort_keys=True) + "\n")
            os.replace(partial, self.file)
        except OSError as exc:  # a read-only cache: the next setup times them again
            log.warning("openvino: could not record the snippets choices in %s (%s)", self.file, exc)


def _compile(
    core: ov.Core, sized: ov.Model, config: dict[str, str], shape: Shape, snippets: str, choices: _Choices
) -> tuple[ov.InferRequest, str]:
    """The shape's compiled model with attention fused or not (SNIPPETS), and what decided it."""

    def compiled(mode: str) -> ov.InferRequest:
        return core.compile_model(sized, "CPU", {**config, **SNIPPETS[mode]}).create_infer_request()

    rng = np.random.default_rng(0)
    inputs = [
        np.full(dims, 999, dtype=np.int64)  # the timestep
        if port.get_element_type().is_integral()
        else rng.standard_normal(dims, dtype=np.float32)
        for port, dims in zip(sized.inputs, shape, strict=True)
    ]
    if snippets != "auto":
        mode, why = snippets, f"{snippets} ({SNIPPETS_ENV})"
    elif (known := choices.get(shape)) is not None:
        mode, why = known, f"{known} (timed in an earlier setup)"
    else:
        ms: dict[str, float] = {}
        timed = None
        for name in SNIPPETS:
            timed = None  # one compiled model at a time: each holds its own copy of the weights
            timed = compiled(name)
            timed.infer(inputs)  # the first pass also allocates and faults in its buffers: untimed
            start = time.perf_counter()
            timed.infer(inputs)
            ms[name] = round((time.perf_counter() - start) * 1000, 1)
        mode = min(ms, key=ms.__getitem__)
        choices.put(shape, mode, ms)
        why = f"{mode}, timed: " + ", ".join(f"{m} {t:.0f} ms" for m, t in ms.items())
        if mode == name:  # the last one timed: compiled and warm already
            return timed, why
        timed = None
    request = compiled(mode)
    # In setup rather than in the first request: a first pass allocates and faults in its buffers
    # (at 768 px it took 2.6 s longer than the next).
    request.infer(inputs)
    return request, why


def _convert(part: _Part, module: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> ov.Model:
    """Trace the module's method; float inputs and the output cross as f32 whatever its dtype."""
    with torch.inference_mode(False), torch.no_grad():
        model = ov.convert_model(_Traced(part, module), example_input=example)
    steps = ov.preprocess.PrePostProcessor(model)
    for i, tensor in enumerate(example):
        if tensor.is_floating_point():
            steps.input(i).tensor().set_element_type(ov.Type.f32)
    steps.output(0).tensor().set_element_type(ov.Type.f32)
    return steps.build()


@contextmanager
def _contiguous(module: torch.nn.Module) -> Iterator[None]:
    """Contiguous weights while converting and compiling: OpenVINO 2026.4 reads bf16 channels_last
    weights as if they were contiguous (the model then computes NaN), and a converted model's
    constants point into the torch tensors it was converted from, without holding them."""
    strided = [(p, p.data) for p in module.parameters() if not p.data.is_contiguous()]
    for param, data in strided:
        param.data = data.contiguous()
    try:
        yield
    finally:
        for param, data in strided:
            param.data = data


def cache_key(weights_dir: Path, part: _Part, dtype: torch.dtype, trace_latent: int, folded: bool) -> str:
    """The converted model's directory name: the module, its dtype, and a hash of what made it."""
    made_from = {
        "files": [file_identity(weights_dir, name) for name in part.files],
        "openvino": ov.get_version(),
        "diffusers": diffusers.__version__,
        "shapes": SHAPES,
        "trace_latent": trace_latent,
        "folded": folded,
    }
    digest = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]
    return f"{part.name}-{PRECISIONS[dtype]}-{digest}"


def cache_roots(weights_dir: Path) -> list[Path]:
    """Where converted models are looked for, in order: LCM_OPENVINO_CACHE alone when set."""
    chosen = os.environ.get(OPENVINO_CACHE_ENV)
    return [Path(chosen)] if chosen else [weights_dir / CACHE_DIR, DEFAULT_CACHE]


def _save(model: ov.Model, weights_dir: Path, key: str) -> Optional[Path]:
    """Save into the first writable cache root; a key's directory appears whole or not at all."""
    failures = []
    for root in cache_roots(weights_dir):
        partial = root / f"{key}.partial-{os.getpid()}"
        try:
            partial.mkdir(parents=True, exist_ok=True)
            ov.save_model(model, partial / MODEL_FILE, compress_to_fp16=False)
            os.replace(partial, root / key)
            return root / key
        except OSError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            failures.append(f"{root}: {exc}")
    log.warning("openvino: could not save the converted model (%s)", "; ".join(failures))
    return None
