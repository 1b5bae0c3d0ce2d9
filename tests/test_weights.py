"""The weights layout, its checks and manifest, and scripts/download-weights against a fake hub (offline)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from transformers import CLIPTokenizer

from lcm.errors import WeightsError
from lcm.weights import (
    CONTROLNET_FILES,
    DEFAULT_WEIGHTS_DIR,
    MANIFEST_NAME,
    REQUIRED_FILES,
    TOKENIZER_JSON,
    TOKENIZER_LAYOUTS,
    WEIGHT_FILES,
    check_weights,
    files_to_download,
    required_files,
    select_files,
    tokenizer_layout,
    verify_weights,
    weights_dir,
    write_manifest,
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "download-weights"
REPO = "SimianLuo/LCM_Dreamshaper_v7"
UNET = "unet/diffusion_pytorch_model.safetensors"
# The files of a directory whose tokenizer is in save_pretrained's layout (tokenizer.json).
SAVED_LAYOUT = (
    *(name for name in REQUIRED_FILES if name not in TOKENIZER_LAYOUTS["hub"]),
    *TOKENIZER_LAYOUTS["save_pretrained"],
)
EITHER_LAYOUT = "Either tokenizer layout is accepted"

# The hub repo as it looks: fp32 and fp16 weights in safetensors and pickle form, plus a single-file
# checkpoint, a README and images that the pipeline never needs.
REAL_LISTING = [
    ".gitattributes",
    "LCM_Dreamshaper_v7_4k.safetensors",
    "README.md",
    "lcm_logo.png",
    "teaser.png",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
EXPECTED_SELECTION = {
    "model_index.json": "model_index.json",
    "scheduler/scheduler_config.json": "scheduler/scheduler_config.json",
    "text_encoder/config.json": "text_encoder/config.json",
    "tokenizer/vocab.json": "tokenizer/vocab.json",
    "tokenizer/merges.txt": "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json": "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json": "tokenizer/tokenizer_config.json",
    "unet/config.json": "unet/config.json",
    "vae/config.json": "vae/config.json",
    "safety_checker/config.json": "safety_checker/config.json",
    "feature_extractor/preprocessor_config.json": "feature_extractor/preprocessor_config.json",
    "text_encoder/model.fp16.safetensors": "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors": "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors": "vae/diffusion_pytorch_model.safetensors",
    "safety_checker/model.fp16.safetensors": "safety_checker/model.safetensors",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LCM_WEIGHTS_DIR", raising=False)


def fill(folder: Path, names=REQUIRED_FILES) -> Path:
    """A weights directory whose files hold their own names (enough for the cheap checks)."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"contents of {name}\n")
    return folder


def test_weights_dir_prefers_argument_then_env_then_default(tmp_path, monkeypatch):
    assert weights_dir() == DEFAULT_WEIGHTS_DIR
    assert DEFAULT_WEIGHTS_DIR == Path(__file__).resolve().parent.parent / "weights"
    monkeypatch.setenv("LCM_WEIGHTS_DIR", str(tmp_path / "env"))
    assert weights_dir() == tmp_path / "env"
    assert weights_dir("") == tmp_path / "env"
    assert weights_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.chdir(tmp_path)
    assert weights_dir("relative") == tmp_path / "relative"


def test_layout_separates_weights_from_configs():
    assert set(WEIGHT_FILES.values()) <= set(REQUIRED_FILES)
    assert all(name.endswith(".safetensors") for name in WEIGHT_FILES.values())
    assert not any(name.endswith(".safetensors") for name in set(REQUIRED_FILES) - set(WEIGHT_FILES.values()))


def test_config_files_match_the_configs_shipped_with_the_package():
    shipped = Path(__file__).resolve().parent.parent / "lcm" / "configs" / "lcm-dreamshaper-v7"
    if not shipped.is_dir():
        pytest.skip(f"{shipped} is not in this checkout")
    on_disk = {str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file() and p.suffix != ".md"}
    assert on_disk == set(REQUIRED_FILES) - set(WEIGHT_FILES.values())


def test_select_files_picks_fp16_safetensors_and_configs_only():
    assert select_files(REAL_LISTING) == EXPECTED_SELECTION


def test_select_files_keeps_the_hub_tokenizer_layout_beside_a_tokenizer_json():
    assert select_files([*REAL_LISTING, TOKENIZER_JSON]) == EXPECTED_SELECTION


def test_select_files_falls_back_to_standard_safetensors():
    listing = [name for name in REAL_LISTING if ".fp16." not in name]
    selection = select_files(listing)
    assert selection[UNET] == UNET
    assert set(selection.values()) == set(REQUIRED_FILES)
    assert all(remote == local for remote, local in selection.items())


def test_select_files_names_a_missing_component():
    listing = [
        name for name in REAL_LISTING if not name.startswith("vae/") and name != "tokenizer/merges.txt"
    ]
    with pytest.raises(WeightsError) as caught:
        select_files(listing)
    message = str(caught.value)
    assert "vae/config.json" in message
    assert "vae/diffusion_pytorch_model.safetensors" in message
    assert "tokenizer/merges.txt" in message
    assert "unet/" not in message


def test_select_files_never_takes_a_pickle():
    listing = [
        name for name in REAL_LISTING if not (name.startswith("unet/") and name.endswith(".safetensors"))
    ]
    with pytest.raises(WeightsError, match="pickles are never loaded") as caught:
        select_files(listing)
    assert UNET in str(caught.value)


def assert_actionable(message: str, folder: Path, missing: str) -> None:
    assert str(folder) in message
    assert missing in message
    assert "download-weights" in message
    assert f"python -m lcm.synthetic {folder} --size full" in message


def test_check_weights_accepts_a_complete_directory(tmp_path):
    assert check_weights(fill(tmp_path)) == tmp_path


def test_check_weights_on_an_empty_directory(tmp_path):
    with pytest.raises(WeightsError) as caught:
        check_weights(tmp_path)
    assert_actionable(str(caught.value), tmp_path, UNET)
    assert f"--dir {tmp_path}" in str(caught.value)
    assert all(name in str(caught.value) for name in REQUIRED_FILES)


def test_check_weights_on_a_directory_that_does_not_exist(tmp_path):
    with pytest.raises(WeightsError, match="does not exist") as caught:
        check_weights(tmp_path / "nowhere")
    assert_actionable(str(caught.value), tmp_path / "nowhere", "nowhere")


def test_check_weights_default_dir_message_has_no_dir_flag(monkeypatch, tmp_path):
    monkeypatch.setattr("lcm.weights.DEFAULT_WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsError) as caught:
        check_weights()
    assert "  scripts/download-weights\n" in str(caught.value)
    assert "--dir" not in str(caught.value)


def test_check_weights_names_the_one_missing_file(tmp_path):
    fill(tmp_path)
    (tmp_path / "tokenizer/merges.txt").unlink()
    with pytest.raises(
        WeightsError, match=f"missing 1 of the {len(REQUIRED_FILES)} required files"
    ) as caught:
        check_weights(tmp_path)
    assert_actionable(str(caught.value), tmp_path, "tokenizer/merges.txt")
    assert UNET not in str(caught.value)
    assert EITHER_LAYOUT in str(caught.value) and TOKENIZER_JSON in str(caught.value)


def test_check_weights_counts_an_empty_file_as_missing(tmp_path):
    fill(tmp_path)
    (tmp_path / UNET).write_bytes(b"")
    with pytest.raises(WeightsError, match="empty") as caught:
        check_weights(tmp_path)
    assert_actionable(str(caught.value), tmp_path, UNET)
    assert EITHER_LAYOUT not in str(caught.value)  # the tokenizer is complete: no word about it


def test_check_weights_rejects_a_pickle_only_unet(tmp_path):
    fill(tmp_path)
    (tmp_path / UNET).unlink()
    (tmp_path / "unet/diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="only safetensors are loaded") as caught:
        check_weights(tmp_path)
    assert_actionable(str(caught.value), tmp_path, UNET)
    assert "unet/diffusion_pytorch_model.bin" in str(caught.value)


def test_check_weights_accepts_save_pretrained_tokenizer_layout(tmp_path):
    fill(tmp_path, SAVED_LAYOUT)
    assert tokenizer_layout(tmp_path) == "save_pretrained"
    assert set(required_files(tmp_path)) == set(SAVED_LAYOUT)
    assert check_weights(tmp_path) == tmp_path
    (tmp_path / "tokenizer/tokenizer_config.json").unlink()
    with pytest.raises(WeightsError, match=f"missing 1 of the {len(SAVED_LAYOUT)} required files") as caught:
        check_weights(tmp_path)
    assert_actionable(str(caught.value), tmp_path, "tokenizer/tokenizer_config.json")
    assert EITHER_LAYOUT in str(caught.value) and "tokenizer/vocab.json" in str(caught.value)


def test_a_tokenizer_json_decides_the_layout(tmp_path):
    """CLIPTokenizer reads tokenizer.json whenever there is one, so the checks require and hash that."""
    fill(tmp_path, {*REQUIRED_FILES, TOKENIZER_JSON})
    assert tokenizer_layout(tmp_path) == "save_pretrained"
    assert TOKENIZER_JSON in required_files(tmp_path)
    assert "tokenizer/vocab.json" not in required_files(tmp_path)
    (tmp_path / TOKENIZER_JSON).write_bytes(b"")
    with pytest.raises(WeightsError, match=f"{TOKENIZER_JSON} \\(empty\\)"):
        check_weights(tmp_path)


def test_manifest_size_mismatch_is_named(tmp_path):
    manifest = write_manifest(fill(tmp_path), source="test")
    assert manifest == tmp_path / MANIFEST_NAME
    assert check_weights(tmp_path) == tmp_path
    with (tmp_path / UNET).open("ab") as handle:
        handle.write(b"more")
    with pytest.raises(WeightsError, match="size differs") as caught:
        check_weights(tmp_path)
    assert UNET in str(caught.value)
    assert "vae/" not in str(caught.value)


def test_verify_weights_catches_a_changed_byte_of_the_same_size(tmp_path):
    write_manifest(fill(tmp_path))
    assert verify_weights(tmp_path) == tmp_path
    data = bytearray((tmp_path / UNET).read_bytes())
    data[0] ^= 1
    (tmp_path / UNET).write_bytes(bytes(data))
    assert check_weights(tmp_path) == tmp_path
    with pytest.raises(WeightsError, match="sha256 differs") as caught:
        verify_weights(tmp_path)
    assert UNET in str(caught.value)


def test_verify_weights_needs_a_manifest(tmp_path):
    with pytest.raises(WeightsError, match="no manifest.json"):
        verify_weights(fill(tmp_path))


def test_a_corrupt_manifest_says_how_to_recover(tmp_path):
    fill(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(WeightsError, match="not a valid weights manifest") as caught:
        check_weights(tmp_path)
    assert "download-weights" in str(caught.value)


def test_files_to_download_trusts_only_the_same_source(tmp_path):
    write_manifest(fill(tmp_path), source=f"{REPO}@main")
    assert files_to_download(tmp_path, f"{REPO}@main") == []
    assert files_to_download(tmp_path, f"{REPO}@other") == list(REQUIRED_FILES)
    (tmp_path / UNET).write_text("truncated")
    assert files_to_download(tmp_path, f"{REPO}@main") == [UNET]
    write_manifest(tmp_path)
    assert files_to_download(tmp_path, f"{REPO}@main") == list(REQUIRED_FILES)
    assert files_to_download(tmp_path / "absent", f"{REPO}@main") == list(REQUIRED_FILES)


# A checkpoint written by diffusers' own save_pretrained, not by lcm.synthetic.


@pytest.fixture(scope="module")
def saved_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    from diffusers import LatentConsistencyModelPipeline

    saved = tmp_path_factory.mktemp("saved") / "weights"
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        tiny_checkpoint, local_files_only=True, use_safetensors=True
    )
    pipe.save_pretrained(saved)
    return saved


def test_save_pretrained_writes_the_other_layouts(saved_checkpoint):
    """What the tests below rely on: save_pretrained's tokenizer.json and PIL image processor."""
    assert tokenizer_layout(saved_checkpoint) == "save_pretrained"
    assert not (saved_checkpoint / "tokenizer/vocab.json").exists()
    index = json.loads((saved_checkpoint / "model_index.json").read_text())
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessorPil"]


def test_save_pretrained_keeps_the_synthetic_weight_names(saved_checkpoint, tiny_checkpoint):
    """Loaded from the synthetic files (the hub's names), the pipeline is saved under the same names."""
    for name in WEIGHT_FILES.values():
        with (
            safe_open(saved_checkpoint / name, framework="pt") as saved,
            safe_open(tiny_checkpoint / name, framework="pt") as synthetic,
        ):
            assert set(saved.keys()) == set(synthetic.keys()), name


def test_a_pipeline_saved_by_diffusers_loads_and_draws_the_same_images(saved_checkpoint, engine):
    from lcm.engine import Engine
    from lcm.params import Request

    request = Request.build("a cat", width=256, height=256, seed=1, num_inference_steps=2)
    saved = Engine.load(saved_checkpoint, device="cpu")
    try:
        assert type(saved.model.pipe.feature_extractor).__name__ == "CLIPImageProcessorPil"
        assert np.array_equal(saved.generate(request).pixels, engine.generate(request).pixels)
    finally:
        saved.close()


def test_a_tokenizer_json_is_what_clip_tokenizer_reads(saved_checkpoint, tiny_checkpoint, tmp_path):
    """Beside the hub's vocab.json and merges.txt, tokenizer.json wins (tokenizer_layout relies on it)."""
    both = tmp_path / "tokenizer"
    shutil.copytree(saved_checkpoint / "tokenizer", both)
    (both / "vocab.json").write_text('{"not": 0}')
    (both / "merges.txt").write_text("#version: 0.2\n")
    ids = CLIPTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")("a cat on a mat").input_ids
    assert CLIPTokenizer.from_pretrained(both)("a cat on a mat").input_ids == ids


def test_manifest_and_verify_on_a_save_pretrained_directory(saved_checkpoint, tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(saved_checkpoint, root)
    write_manifest(root, "test")
    recorded = json.loads((root / MANIFEST_NAME).read_text())["files"]
    assert set(recorded) == set(SAVED_LAYOUT)
    assert verify_weights(root) == root
    data = bytearray((root / TOKENIZER_JSON).read_bytes())
    data[-2] ^= 1
    (root / TOKENIZER_JSON).write_bytes(bytes(data))
    assert check_weights(root) == root  # same size: only the hash can tell
    with pytest.raises(WeightsError, match=f"{TOKENIZER_JSON}: sha256 differs"):
        verify_weights(root)


# scripts/download-weights, against a fake hub that serves a local folder.


@pytest.fixture
def script():
    loader = importlib.machinery.SourceFileLoader("download_weights", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


TAESD_REMOTE = ("config.json", "diffusion_pytorch_model.safetensors")
CONTROLNET_REPO = "lllyasviel/control_v11p_sd15_canny"
# The ControlNet repo's weights as it holds them: fp32 and fp16, each as safetensors and as a pickle.
CONTROLNET_LISTING = (
    "config.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors",
)
CONTROLNET_FETCHED = [
    f"{CONTROLNET_REPO}/config.json",
    f"{CONTROLNET_REPO}/diffusion_pytorch_model.fp16.safetensors",
]
OPTIONAL_FETCHED = [*(f"madebyollin/taesd/{n}" for n in TAESD_REMOTE), *CONTROLNET_FETCHED]
OPTIONAL_LOCAL = {*(f"taesd/{n}" for n in TAESD_REMOTE), *CONTROLNET_FILES}


def test_taesd_is_optional_a_failed_fetch_only_warns(tmp_path, script, hub, load_checks, capsys):
    shutil.rmtree(tmp_path / "madebyollin")
    assert script.main(["--dir", str(tmp_path / "weights")]) == 0
    assert not (tmp_path / "weights" / "taesd").exists()
    assert "could not fetch madebyollin/taesd" in capsys.readouterr().err


def test_the_controlnet_is_optional_a_failed_fetch_only_warns(tmp_path, script, hub, load_checks, capsys):
    shutil.rmtree(tmp_path / CONTROLNET_REPO)
    target = tmp_path / "weights"
    assert script.main(["--dir", str(target)]) == 0
    assert not (target / "controlnet-canny").exists()
    assert f"could not fetch {CONTROLNET_REPO}" in capsys.readouterr().err
    verify_weights(target)


def test_a_later_run_fetches_a_missing_controlnet_and_the_manifest_covers_it(
    tmp_path, script, hub, load_checks
):
    target = tmp_path / "weights"
    assert script.main(["--dir", str(target)]) == 0
    shutil.rmtree(target / "controlnet-canny")
    hub.downloaded.clear()
    assert script.main(["--dir", str(target)]) == 0
    assert hub.downloaded == CONTROLNET_FETCHED
    verify_weights(target)
    (target / CONTROLNET_FILES[1]).write_text("controlnet file diffusion_pytorch_model.fp16.safetensorX\n")
    with pytest.raises(WeightsError, match="controlnet-canny/diffusion_pytorch_model.safetensors: sha256"):
        verify_weights(target)


class FakeHub:
    """HfApi().list_repo_files and hf_hub_download over a local folder; records what is downloaded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.downloaded: list[str] = []
        self.fail_after: int | None = None

    def api(self) -> "FakeHub":
        return self

    def list_repo_files(self, repo_id: str, *, revision: str | None = None) -> list[str]:
        folder = self.root if repo_id == REPO else self.root.parent / repo_id
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str | None = None, local_dir) -> str:
        if self.fail_after is not None and len(self.downloaded) >= self.fail_after:
            raise ConnectionError("connection reset by peer")
        source = self.root / filename if repo_id == REPO else self.root.parent / repo_id / filename
        destination = Path(local_dir) / filename
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
        self.downloaded.append(filename if repo_id == REPO else f"{repo_id}/{filename}")
        return str(destination)


@pytest.fixture
def hub(tmp_path, script, monkeypatch):
    root = tmp_path / "hub"
    for name in REAL_LISTING:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"hub file {name}\n")
    for name in TAESD_REMOTE:
        (tmp_path / "madebyollin" / "taesd" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "madebyollin" / "taesd" / name).write_text(f"taesd file {name}\n")
    for name in CONTROLNET_LISTING:
        (tmp_path / CONTROLNET_REPO / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / CONTROLNET_REPO / name).write_text(f"controlnet file {name}\n")
    fake = FakeHub(root)
    monkeypatch.setattr(script, "HfApi", fake.api)
    monkeypatch.setattr(script, "hf_hub_download", fake.hf_hub_download)
    return fake


@pytest.fixture
def load_checks(script, monkeypatch) -> list[Path]:
    calls: list[Path] = []
    monkeypatch.setattr(script, "check_loads", calls.append)
    return calls


def test_download_fills_the_layout_then_downloads_nothing(tmp_path, script, hub, load_checks, capsys):
    target = tmp_path / "weights"
    assert script.main(["--dir", str(target)]) == 0
    assert sorted(hub.downloaded) == sorted([*EXPECTED_SELECTION, *OPTIONAL_FETCHED])
    files = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert files == set(REQUIRED_FILES) | {MANIFEST_NAME} | OPTIONAL_LOCAL
    assert (target / "taesd" / "config.json").read_text() == "taesd file config.json\n"
    weights = target / CONTROLNET_FILES[1]
    assert weights.read_text() == "controlnet file diffusion_pytorch_model.fp16.safetensors\n"
    assert (
        set(json.loads((target / MANIFEST_NAME).read_text())["files"]) == set(REQUIRED_FILES) | OPTIONAL_LOCAL
    )
    for remote, local in EXPECTED_SELECTION.items():
        assert (target / local).read_text() == f"hub file {remote}\n"
    assert load_checks == [target]
    verify_weights(target)

    hub.downloaded.clear()
    assert script.main(["--dir", str(target)]) == 0
    assert hub.downloaded == []
    assert load_checks == [target, target]
    assert "nothing to download" in capsys.readouterr().out


def test_download_over_a_save_pretrained_directory_installs_the_hub_tokenizer(
    tmp_path, script, hub, load_checks
):
    target = fill(tmp_path / "weights", SAVED_LAYOUT)
    write_manifest(target, source="elsewhere")
    assert script.main(["--dir", str(target)]) == 0
    assert not (target / TOKENIZER_JSON).exists()  # it would be loaded instead of the hub's files
    assert tokenizer_layout(target) == "hub"
    assert (target / "tokenizer/vocab.json").read_text() == "hub file tokenizer/vocab.json\n"
    verify_weights(target)


def test_download_uses_lcm_weights_dir(tmp_path, script, hub, load_checks, monkeypatch):
    monkeypatch.setenv("LCM_WEIGHTS_DIR", str(tmp_path / "from-env"))
    assert script.main([]) == 0
    assert check_weights(tmp_path / "from-env") == tmp_path / "from-env"


def test_download_refetches_only_a_damaged_file(tmp_path, script, hub, load_checks):
    target = tmp_path / "weights"
    assert script.main(["--dir", str(target)]) == 0
    (target / UNET).write_text("cut")
    hub.downloaded.clear()
    assert script.main(["--dir", str(target)]) == 0
    assert hub.downloaded == ["unet/diffusion_pytorch_model.fp16.safetensors"]
    verify_weights(target)


def test_download_replaces_a_checkpoint_from_another_source(tmp_path, script, hub, load_checks):
    target = fill(tmp_path / "weights")
    for name in TAESD_REMOTE:
        (target / "taesd" / name).parent.mkdir(exist_ok=True)
        (target / "taesd" / name).write_text("synthetic\n")
    (target / "synthetic.json").write_text("{}\n")
    write_manifest(target, source="synthetic")
    assert script.main(["--dir", str(target)]) == 0
    assert sorted(hub.downloaded) == sorted([*EXPECTED_SELECTION, *OPTIONAL_FETCHED])
    assert (target / "taesd" / "config.json").read_text() == "taesd file config.json\n"
    assert not (target / "synthetic.json").exists()
    assert (target / UNET).read_text() == "hub file unet/diffusion_pytorch_model.fp16.safetensors\n"


def test_interrupted_download_leaves_no_file_under_a_final_name(tmp_path, script, hub, load_checks, capsys):
    target = tmp_path / "weights"
    hub.fail_after = 13
    assert script.main(["--dir", str(target)]) == 1
    assert not any((target / name).exists() for name in REQUIRED_FILES)
    assert load_checks == []
    err = capsys.readouterr().err
    assert "cannot download" in err and "Hugging Face hub" in err
    assert f"python -m lcm.synthetic {target} --size full" in err
    assert (target / script.STAGING_NAME).is_dir()

    hub.fail_after = None
    assert script.main(["--dir", str(target)]) == 0
    assert not (target / script.STAGING_NAME).exists()
    verify_weights(target)


def test_unreachable_hub_points_to_the_synthetic_checkpoint(
    tmp_path, script, monkeypatch, load_checks, capsys
):
    class OfflineApi:
        def list_repo_files(self, repo_id: str, *, revision: str | None = None) -> list[str]:
            raise OSError("Name or service not known")

    monkeypatch.setattr(script, "HfApi", OfflineApi)
    target = tmp_path / "weights"
    assert script.main(["--dir", str(target)]) == 1
    err = capsys.readouterr().err
    assert "cannot download SimianLuo/LCM_Dreamshaper_v7@main from the Hugging Face hub" in err
    assert "can reach https://huggingface.co" in err
    assert f"python -m lcm.synthetic {target} --size full" in err
    assert load_checks == []
