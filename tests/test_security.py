"""What a hostile request or a planted file cannot make the service do.

No network at setup or predict; no pickle, ever; no remote code; output names never from input;
no shell anywhere near a prompt.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cogserver import ROOT
from lcm.loading import load_pipeline, load_taesd
from lcm.params import Request

SOURCES = sorted([*(ROOT / "lcm").rglob("*.py"), ROOT / "predict.py"])
CPU = torch.device("cpu")

# Run in a fresh interpreter, so the socket functions are blocked before any library is imported.
NO_NETWORK_RUN = """
import asyncio, base64, inspect, json, socket, sys, urllib.request
from pathlib import Path

attempts = []

def blocked(name):
    def refuse(*args, **kwargs):
        attempts.append(f"{name}{args[:2]!r}")
        raise OSError(f"network access blocked by the test: {name}")
    return refuse

socket.socket.connect = blocked("connect")
socket.socket.connect_ex = blocked("connect_ex")
socket.create_connection = blocked("create_connection")
socket.getaddrinfo = blocked("getaddrinfo")

import predict

predictor = predict.Predictor()
predictor.setup()
defaults = {
    name: param.default.default
    for name, param in inspect.signature(predict.Predictor.predict).parameters.items()
    if name != "self"
}
small = dict(defaults, width=256, height=256, num_inference_steps=1, seed=1)
files = [p.name for p in asyncio.run(predictor.predict(**small))]
# The image as Cog's worker hands it over: a data: URL, downloaded by URLPath.convert.
url = "data:image/png;base64," + base64.b64encode(Path(sys.argv[1]).read_bytes()).decode()
image = predict.cog.types.Path.validate(url).convert()
files += [p.name for p in asyncio.run(predictor.predict(**dict(small, image=image, width=None, height=None)))]
made = list(attempts)
try:  # the block itself works: a deliberate request is caught
    urllib.request.urlopen("http://127.0.0.1:9/", timeout=1)
except OSError:
    pass
print(json.dumps({"attempts": made, "probe": len(attempts) - len(made), "files": files}))
"""


def test_setup_and_predict_open_no_network_connection(tiny_checkpoint, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (256, 256), (200, 30, 30)).save(photo)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LCM_WEIGHTS_DIR": str(tiny_checkpoint),
        "LCM_DEVICE": "cpu",
        "TMPDIR": str(tmp_path),
        # Offline mode explicitly off, so only our own code keeps the hub away.
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "0",
    }
    run = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_RUN, str(photo)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["attempts"] == [] and result["probe"] >= 1
    assert result["files"] == ["lcm-1.png", "lcm-1.png"]


class Planted:
    """Unpickling this creates a marker file: proof that a pickle was read."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_only_safetensors_are_read_even_beside_planted_pickles(tiny_checkpoint, tmp_path, monkeypatch):
    root = tmp_path / "weights"
    shutil.copytree(tiny_checkpoint, root)
    marker = tmp_path / "unpickled"
    planted = [
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
        "safety_checker/pytorch_model.bin",
        "taesd/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.ckpt",
    ]
    for name in planted:
        (root / name).write_bytes(pickle.dumps(Planted(marker)))
    reads: list[str] = []

    def refuse(name):
        def record(*args, **kwargs):
            reads.append(name)
            raise AssertionError(f"{name} called while loading")

        return record

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    pipe = load_pipeline(root, CPU, torch.float32)
    assert load_taesd(root, CPU, torch.float32) is not None
    assert pipe.unet is not None and pipe.safety_checker is not None
    assert reads == [] and not marker.exists()


def calls_and_keywords(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Dotted names of everything called, and every keyword argument name, in a module."""
    called, keywords = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called.add(ast.unparse(node.func))
            keywords |= {k.arg for k in node.keywords if k.arg}
    return called, keywords


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_remote_code_and_no_shell(source):
    text = source.read_text()
    tree = ast.parse(text)
    called, keywords = calls_and_keywords(tree)
    assert not keywords & {"trust_remote_code", "custom_pipeline", "shell"}
    assert "trust_remote_code" not in text and "custom_pipeline" not in text
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"subprocess", "pty"}
    shells = {"os.system", "os.popen", "eval", "exec", "compile", "__import__", "importlib.import_module"}
    shells |= {name for name in called if name.startswith(("os.exec", "os.spawn", "os.posix_spawn"))}
    assert not called & shells


@pytest.mark.parametrize(
    "prompt",
    ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\system32", "name\x00.png"],
)
def test_output_files_are_named_from_the_seed_only(engine, tmp_path, prompt):
    out = tmp_path / "out"
    out.mkdir()
    request = Request.build(
        prompt=prompt,
        width=256,
        height=256,
        num_images=2,
        num_inference_steps=1,
        seed=40,
        disable_safety_checker=True,
    )
    paths = engine.generate_files(request, out)
    assert [p.name for p in paths] == ["lcm-40.png", "lcm-41.png"]
    assert all(p.parent == out for p in paths)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out",
        "out/lcm-40.png",
        "out/lcm-41.png",
    ]


def test_a_server_local_path_is_not_accepted_as_an_image(server, tmp_path):
    secret = tmp_path / "private.png"
    Image.new("RGB", (256, 256), (1, 2, 3)).save(secret)
    status, body = server.predict(prompt="x", image=str(secret), num_inference_steps=1)
    assert status == 200 and body["status"] == "failed", body
    assert "image=" in body["error"] and "URL" in body["error"]


def test_a_file_directly_in_the_temp_directory_is_not_accepted_as_an_image(server):
    """Cog saves every download directly under the temp directory, as tmp<random><name>: a path
    there, named like another request's upload, must not pass for this request's download."""
    import base64
    import tempfile

    fd, name = tempfile.mkstemp(prefix="tmp", suffix="upload.png", dir=tempfile.gettempdir())
    os.close(fd)
    try:
        Image.new("RGB", (256, 256), (9, 8, 7)).save(name)
        status, body = server.predict(prompt="x", image=name, num_inference_steps=1)
        assert status == 200 and body["status"] == "failed", body
        assert f"image='{name}' is not allowed" in body["error"] and "not accepted" in body["error"]
        data = "data:image/png;base64," + base64.b64encode(Path(name).read_bytes()).decode()
        status, body = server.predict(prompt="x", image=data, num_inference_steps=1)
        assert status == 200 and body["status"] == "succeeded", body  # the same bytes, sent
    finally:
        os.unlink(name)
