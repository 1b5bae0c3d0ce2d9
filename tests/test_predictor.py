"""predict.py in-process and the command line: the same engine, the same files."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest
from PIL import Image

from lcm.cli import main as cli_main


def declared_defaults() -> dict:
    """Every predict() input at the default its cog.Input declares: called directly, predict() gets
    the Input objects themselves for whatever is left out, as Cog never passes them."""
    import predict

    parameters = list(inspect.signature(predict.Predictor.predict).parameters.values())[1:]
    return {p.name: p.default.default for p in parameters}


ARGS = {
    **declared_defaults(),
    "prompt": "a lighthouse",
    "width": 256,
    "height": 256,
    "num_images": 2,
    "num_inference_steps": 2,
    "seed": 99,
}


def run(predictor, **inputs):
    """predict() as Cog's event loop runs it: a coroutine."""
    return asyncio.run(predictor.predict(**inputs))


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint, monkeypatch_module):
    import predict

    monkeypatch_module.setenv("LCM_WEIGHTS_DIR", str(tiny_checkpoint))
    monkeypatch_module.setenv("LCM_DEVICE", "cpu")
    p = predict.Predictor()
    p.setup()
    return p


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_outputs_are_unique_pngs_and_earlier_ones_are_removed(predictor):
    first = run(predictor, **ARGS)
    assert len({p.name for p in first}) == 2
    assert all(Image.open(p).format == "PNG" for p in first)
    second = run(predictor, **{**ARGS, "seed": 5})
    assert all(not p.exists() for p in first)
    assert all(p.exists() for p in second)


def test_failed_prediction_leaves_no_files(predictor):
    from lcm.errors import InputError

    kept = run(predictor, **ARGS)
    with pytest.raises(InputError):
        run(predictor, **{**ARGS, "width": 260})
    assert all(not p.exists() for p in kept)
    assert not predictor.returned


def test_cli_writes_the_same_pngs_as_predict(predictor, tiny_checkpoint, tmp_path):
    via_cog = [np.asarray(Image.open(p)) for p in run(predictor, **ARGS)]
    status = cli_main(
        [
            "generate",
            ARGS["prompt"],
            "--out",
            str(tmp_path),
            "--width",
            "256",
            "--height",
            "256",
            "--num-images",
            "2",
            "--num-inference-steps",
            "2",
            "--seed",
            "99",
            "--weights",
            str(tiny_checkpoint),
            "--device",
            "cpu",
        ]
    )
    assert status == 0
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["lcm-100.png", "lcm-99.png"]
    via_cli = [
        np.asarray(Image.open(tmp_path / "lcm-99.png")),
        np.asarray(Image.open(tmp_path / "lcm-100.png")),
    ]
    assert all(np.array_equal(a, b) for a, b in zip(via_cog, via_cli, strict=True))


def test_cli_reports_bad_input_and_missing_weights(tmp_path, capsys):
    assert cli_main(["generate", "x", "--out", str(tmp_path), "--width", "100"]) == 2
    assert "width=100" in capsys.readouterr().err
    assert cli_main(["generate", "x", "--out", str(tmp_path), "--weights", str(tmp_path / "none")]) == 2
    assert "download-weights" in capsys.readouterr().err


def test_only_the_file_cog_downloaded_for_this_prediction_is_read(predictor):
    """A path directly in the temp directory, where Cog saves every download (tmp<random><name>),
    is refused whether it arrives as the string coglet 0.23.1 passes on or as the cog.Path that
    Cog's own input normaliser (cog._adt) makes of it; the same bytes sent as a data: URL, which
    Cog downloads with URLPath.convert, are read."""
    import base64
    import os
    import tempfile

    import cog.types

    from lcm.errors import InputError

    fd, name = tempfile.mkstemp(prefix="tmp", suffix="upload.png", dir=tempfile.gettempdir())
    os.close(fd)
    try:
        Image.new("RGB", (256, 256), (9, 8, 7)).save(name)
        args = dict(ARGS, num_images=1, width=None, height=None)
        for given in (name, cog.types.Path.validate(name)):
            with pytest.raises(InputError, match=f"image='{name}' is not allowed"):
                run(predictor, **dict(args, image=given))
        url = "data:image/png;base64," + base64.b64encode(open(name, "rb").read()).decode()
        downloaded = cog.types.Path.validate(url).convert()
        assert os.path.dirname(downloaded) == tempfile.gettempdir()
        assert len(run(predictor, **dict(args, image=downloaded))) == 1
        with pytest.raises(InputError, match="image="):  # a download counts for its own prediction only
            run(predictor, **dict(args, image=downloaded))
        os.unlink(downloaded)
    finally:
        os.unlink(name)


def test_building_a_request_never_stalls_the_event_loop(predictor, monkeypatch):
    """Request.build reads the input images and parses a weighted prompt (up to seconds): other
    slots' coroutines on Cog's event loop must run meanwhile."""
    import threading
    import types

    import predict

    build, ticked = predict.Request.build, threading.Event()

    def slow_build(**inputs):
        assert ticked.wait(30), "the event loop did not run while the request was being built"
        return build(**inputs)

    monkeypatch.setattr(predict, "Request", types.SimpleNamespace(build=slow_build))

    async def predict_and_tick():
        async def tick():
            await asyncio.sleep(0)
            ticked.set()

        paths, _ = await asyncio.gather(predictor.predict(**ARGS), tick())
        return paths

    assert len(asyncio.run(predict_and_tick())) == ARGS["num_images"]
