"""Where the weights live and how they are checked.

The weights directory holds the diffusers layout of SimianLuo/LCM_Dreamshaper_v7 with every weight
file under its standard (non-variant) name, so loading needs no `variant` argument, and its tokenizer
in the hub's layout or in the one diffusers' save_pretrained writes. Only safetensors
are ever loaded: pickle files (.bin, .ckpt, .pt, ...) can run code when unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path

from lcm.errors import WeightsError

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
WEIGHTS_ENV = "LCM_WEIGHTS_DIR"
MANIFEST_NAME = "manifest.json"

# The tokenizer in either of the two layouts CLIPTokenizer reads: the hub's, as
# SimianLuo/LCM_Dreamshaper_v7 ships it, or the single tokenizer.json that save_pretrained writes
# (transformers 5). CLIPTokenizer loads tokenizer.json whenever there is one, so its presence decides.
TOKENIZER_JSON = "tokenizer/tokenizer.json"
TOKENIZER_LAYOUTS: dict[str, tuple[str, ...]] = {
    "hub": (
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
    ),
    "save_pretrained": (TOKENIZER_JSON, "tokenizer/tokenizer_config.json"),
}
_TOKENIZER_FILES = {name for files in TOKENIZER_LAYOUTS.values() for name in files}
_TOKENIZER_NOTE = "Either tokenizer layout is accepted: " + " or ".join(
    f"the {layout} layout ({', '.join(files)})" for layout, files in TOKENIZER_LAYOUTS.items()
)
# Required files per pipeline component, as paths inside the weights directory; the tokenizer in the
# hub layout, which is what a download fetches (config_files gives a directory's own).
CONFIG_FILES: dict[str, tuple[str, ...]] = {
    "pipeline": ("model_index.json",),
    "scheduler": ("scheduler/scheduler_config.json",),
    "text_encoder": ("text_encoder/config.json",),
    "tokenizer": TOKENIZER_LAYOUTS["hub"],
    "unet": ("unet/config.json",),
    "vae": ("vae/config.json",),
    "safety_checker": ("safety_checker/config.json",),
    "feature_extractor": ("feature_extractor/preprocessor_config.json",),
}
WEIGHT_FILES: dict[str, str] = {
    "text_encoder": "text_encoder/model.safetensors",
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "safety_checker": "safety_checker/model.safetensors",
}
# Optional models, each in its own folder (config, then weights): without one, only the input that
# needs it is unavailable. The manifest records those present.
TAESD_FILES = ("taesd/config.json", "taesd/diffusion_pytorch_model.safetensors")
CONTROLNET_FILES = ("controlnet-canny/config.json", "controlnet-canny/diffusion_pytorch_model.safetensors")
OPTIONAL_FILES = (*TAESD_FILES, *CONTROLNET_FILES)


def _required(configs: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    return (*(name for names in configs.values() for name in names), *WEIGHT_FILES.values())


# Every file of the hub layout: what a download fetches and records.
REQUIRED_FILES: tuple[str, ...] = _required(CONFIG_FILES)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
FP16_VARIANT = "fp16"


def weights_dir(path: str | os.PathLike | None = None) -> Path:
    """The weights directory, absolute: `path`, else $LCM_WEIGHTS_DIR, else weights/ at the project root.

    An empty string counts as unset, so an empty Cog `weights` argument or env var falls through.
    """
    return Path(path or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR).expanduser().resolve()


def tokenizer_layout(path: str | os.PathLike | None = None) -> str:
    """The key in TOKENIZER_LAYOUTS of the layout a weights directory's tokenizer is in."""
    return "save_pretrained" if (weights_dir(path) / TOKENIZER_JSON).is_file() else "hub"


def config_files(path: str | os.PathLike | None = None) -> dict[str, tuple[str, ...]]:
    """CONFIG_FILES as a weights directory holds them: its tokenizer in the layout it is in."""
    return {**CONFIG_FILES, "tokenizer": TOKENIZER_LAYOUTS[tokenizer_layout(path)]}


def required_files(path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Every file a weights directory must hold: REQUIRED_FILES, with the tokenizer in its own layout."""
    return _required(config_files(path))


def fill_commands(path: str | os.PathLike | None = None) -> str:
    """The commands that fill `path`, for error messages: the hub download, else a synthetic checkpoint."""
    target = weights_dir(path)
    download = "scripts/download-weights"
    if target != DEFAULT_WEIGHTS_DIR:
        download += f" --dir {shlex.quote(str(target))}"
    return (
        f"Fill it with the real weights (needs Hugging Face hub access):\n  {download}\n"
        "or, without hub access, with a synthetic random-weight checkpoint (its images are noise):\n"
        f"  python -m lcm.synthetic {shlex.quote(str(target))} --size full"
    )


def present_optional_files(path: str | os.PathLike | None = None) -> list[str]:
    """The optional models' files that a weights directory holds."""
    target = weights_dir(path)
    return [name for name in OPTIONAL_FILES if (target / name).is_file()]


def check_weights(path: str | os.PathLike | None = None) -> Path:
    """Fail fast, before an expensive load, with a message that says what is missing and how to fill it.

    Cheap: looks at names and sizes only (sizes against manifest.json when there is one).
    Returns the absolute directory.
    """
    target = _check_present(weights_dir(path))
    manifest = _read_manifest(target)
    if manifest is not None:
        changed = [
            f"  {name}: {(target / name).stat().st_size} bytes, the manifest says {record['size']}"
            for name, record in manifest["files"].items()
            if (target / name).is_file() and (target / name).stat().st_size != record["size"]
        ]
        if changed:
            raise WeightsError(
                f"Weights directory {target} has files whose size differs from {MANIFEST_NAME} "
                "(truncated or replaced):\n" + "\n".join(changed) + f"\n{fill_commands(target)}"
            )
    return target


def _check_present(target: Path) -> Path:
    """Every required file is there and non-empty, and no weight exists only as a pickle."""
    if not target.is_dir():
        raise WeightsError(f"Weights directory {target} does not exist.\n{fill_commands(target)}")
    required = required_files(target)
    problems = {name: problem for name in required if (problem := _missing_reason(target, name))}
    if problems:
        listed = "\n".join(f"  {problem}" for problem in problems.values())
        if _TOKENIZER_FILES.intersection(problems):
            listed += "\n" + _TOKENIZER_NOTE
        raise WeightsError(
            f"Weights directory {target} is incomplete, missing {len(problems)} of the "
            f"{len(required)} required files:\n{listed}\n{fill_commands(target)}"
        )
    return target


def _missing_reason(target: Path, name: str) -> str | None:
    """Why a required file does not count as present, or None when it does."""
    file = target / name
    if file.is_file() and file.stat().st_size > 0:
        return None
    if file.is_file():
        return f"{name} (empty)"
    if name in WEIGHT_FILES.values() and file.parent.is_dir():
        pickles = sorted(p.name for p in file.parent.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            found = ", ".join(f"{file.parent.name}/{p}" for p in pickles)
            return f"{name} (found only {found}: only safetensors are loaded, never pickle files)"
    return name


def select_files(repo_files: list[str]) -> dict[str, str]:
    """Map a hub repo's files to the local layout: {repo path: local path}, nothing the pipeline skips.

    Configs and tokenizer files keep their path; each weight comes from its fp16 safetensors variant
    where the repo has one (half the download, and the pipeline casts on load), else the standard one.
    Pickles, single-file checkpoints, READMEs and images are never selected.
    """
    available = set(repo_files)
    selected: dict[str, str] = {}
    missing: list[str] = []
    for name in REQUIRED_FILES:
        if name not in WEIGHT_FILES.values():
            if name in available:
                selected[name] = name
            else:
                missing.append(name)
            continue
        fp16 = name.removesuffix(".safetensors") + f".{FP16_VARIANT}.safetensors"
        if fp16 in available:
            selected[fp16] = name
        elif name in available:
            selected[name] = name
        else:
            folder = name.rsplit("/", 1)[0] + "/"
            pickles = [f for f in repo_files if f.startswith(folder) and f.endswith(PICKLE_SUFFIXES)]
            note = (
                f"; the repo has only {', '.join(sorted(pickles))}, and pickles are never loaded"
                if pickles
                else ""
            )
            missing.append(f"{name} (or {fp16}){note}")
    if missing:
        raise WeightsError(
            "The hub repository lacks files the pipeline needs:\n"
            + "\n".join(f"  {name}" for name in missing)
            + "\nCheck the repo id and revision: it must hold the diffusers layout of LCM_Dreamshaper_v7."
        )
    return selected


def _read_manifest(path: str | os.PathLike | None = None) -> dict | None:
    """The parsed manifest.json of a weights directory, or None when it has none."""
    manifest = weights_dir(path) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
        files = data["files"]
        if not all(
            isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str) for r in files.values()
        ):
            raise ValueError("every file needs an integer size and a sha256 string")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(
            f"{manifest} is not a valid weights manifest ({exc}). Delete it and run "
            f"scripts/download-weights again, which rewrites it."
        ) from exc
    return data


def write_manifest(path: str | os.PathLike | None = None, source: str | None = None) -> Path:
    """Record the size and sha256 of each required file and each optional one present, so later checks
    can catch truncation or corruption.

    `source` says where the files came from ("repo@revision"); download-weights only trusts present
    files from the same source. Written atomically; returns the manifest's path.
    """
    target = _check_present(weights_dir(path))
    files = {
        name: {"size": (target / name).stat().st_size, "sha256": file_sha256(target / name)}
        for name in (*required_files(target), *present_optional_files(target))
    }
    manifest = target / MANIFEST_NAME
    partial = manifest.with_name(MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps({"source": source, "files": files}, indent=2) + "\n")
    os.replace(partial, manifest)
    return manifest


def verify_weights(path: str | os.PathLike | None = None) -> Path:
    """Full integrity check: the sha256 of every required file, and of every optional one present, against
    manifest.json (reads every byte)."""
    target = check_weights(path)
    manifest = _read_manifest(target)
    if manifest is None:
        raise WeightsError(
            f"Weights directory {target} has no {MANIFEST_NAME} to verify against. "
            "scripts/download-weights writes one; for files you trust, call lcm.weights.write_manifest."
        )
    bad = []
    for name in (*required_files(target), *present_optional_files(target)):
        record = manifest["files"].get(name)
        if record is None:
            bad.append(f"  {name}: not in {MANIFEST_NAME}")
        elif file_sha256(target / name) != record["sha256"]:
            bad.append(f"  {name}: sha256 differs from {MANIFEST_NAME} (corrupted or replaced)")
    if bad:
        raise WeightsError(
            f"Weights directory {target} fails verification:\n"
            + "\n".join(bad)
            + f"\n{fill_commands(target)}"
        )
    return target


def files_to_download(path: str | os.PathLike | None, source: str) -> list[str]:
    """Required files a download from `source` must fetch: all but those the manifest records from it.

    A file counts as present only when the manifest says it came from the same `source` and its size
    still matches, so a synthetic checkpoint in the same directory is never mistaken for the real one.
    """
    target = weights_dir(path)
    manifest = _read_manifest(target)
    if manifest is None or manifest.get("source") != source:
        return list(REQUIRED_FILES)
    present = {
        name
        for name, record in manifest["files"].items()
        if (target / name).is_file() and (target / name).stat().st_size == record["size"]
    }
    return [name for name in REQUIRED_FILES if name not in present]


def file_identity(path: str | os.PathLike | None, name: str) -> dict[str, object]:
    """What tells one version of a weights directory's file from another without reading its bytes.

    The manifest's sha256 where it records the file at its present size (a same-size replacement
    behind the manifest's back is what verify_weights catches), else size and modification time.
    For keys of things derived from the weights, such as a converted model.
    """
    target = weights_dir(path)
    size = (target / name).stat().st_size
    manifest = _read_manifest(target)
    record = manifest["files"].get(name) if manifest is not None else None
    if record is not None and record["size"] == size:
        return {"name": name, "size": size, "sha256": record["sha256"]}
    return {"name": name, "size": size, "mtime_ns": (target / name).stat().st_mtime_ns}


def file_sha256(file: str | os.PathLike) -> str:
    """The file's sha256, read in chunks: weights in the manifest, input files and LoRAs in metadata."""
    with Path(file).open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
