"""predict.py in-process and the command line: the same engine, the same files."""

from __future__ import annotations

import asyncio
import contextlib
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
    assert not predictor.outputs.folders


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


def returned_folder(root, name: str, size: int) -> tuple[str, list]:
    """A prediction's output folder holding one file of `size` bytes."""
    folder = root / name
    folder.mkdir()
    (folder / "out.png").write_bytes(b"x" * size)
    return str(folder), [folder / "out.png"]


def alive(root) -> set[str]:
    return {p.name for p in root.iterdir()}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_over_budget_the_oldest_go_first_once_a_start_with_every_slot_busy_proves_cog_read_them(
    tmp_path, caplog
):
    """With 3 slots: a start with 2 predictions running proves every earlier folder read by Cog, and
    only proven folders go before LCM_KEEP_OUTPUTS_S, oldest first, to within the budget."""
    import predict

    caplog.set_level("INFO", logger="lcm")
    outputs = predict.ReturnedOutputs(slots=3, keep_s=300, keep_bytes=2500, clock=Clock())
    for name in "abcd":  # each alone, two slots free: no proof, though 4000 bytes exceed 2500
        with outputs.predicting():
            outputs.returned(*returned_folder(tmp_path, name, 1000))
    assert alive(tmp_path) == set("abcd") and outputs.size == 4000
    with contextlib.ExitStack() as running:
        for _ in range(2):
            running.enter_context(outputs.predicting())
        assert alive(tmp_path) == set("abcd")  # two of three slots busy: still no proof
        assert not caplog.records
        with outputs.predicting():  # every other slot busy: a to d were read; 4000 -> 2000
            assert alive(tmp_path) == set("cd")
            (line,) = [r.getMessage() for r in caplog.records]
            assert line == (
                "removed 2 returned output folder(s), 0.002 MB, before LCM_KEEP_OUTPUTS_S=300: returned "
                "outputs held 0.004 MB, over LCM_KEEP_OUTPUTS_MB=0.0025, and Cog had read them"
            )
            outputs.returned(*returned_folder(tmp_path, "e", 1000))  # 3000: c goes, proven
            assert alive(tmp_path) == set("de")
            outputs.returned(*returned_folder(tmp_path, "f", 1000))  # 3000: d goes; e, f unproven
            outputs.returned(*returned_folder(tmp_path, "g", 1000))  # 3000, none proven: all stay
            assert alive(tmp_path) == set("efg") and outputs.size == 3000
    assert outputs.running == 0


def test_the_folder_returning_now_stays_and_unproven_ones_go_after_keep_s(tmp_path):
    import predict

    clock = Clock()
    outputs = predict.ReturnedOutputs(slots=2, keep_s=300, keep_bytes=0, clock=clock)
    with outputs.predicting():
        outputs.returned(*returned_folder(tmp_path, "a", 10))  # over a budget of 0, yet kept
    assert alive(tmp_path) == {"a"}
    clock.now = 300.0
    with outputs.predicting():  # one slot free: a is not proven read, and 300 s is not past keep_s
        assert alive(tmp_path) == {"a"}
        with outputs.predicting():  # both slots busy: a was read, and a budget of 0 keeps nothing read
            assert alive(tmp_path) == set()
        outputs.returned(*returned_folder(tmp_path, "b", 10))
    clock.now = 600.5
    with outputs.predicting():  # b unproven, but returned more than keep_s ago
        assert alive(tmp_path) == set()
    assert not outputs.folders and outputs.size == 0


def test_with_one_slot_a_start_removes_every_returned_folder(tmp_path):
    import predict

    outputs = predict.ReturnedOutputs(slots=1, keep_s=300, keep_bytes=10**9, clock=Clock())
    with outputs.predicting():
        outputs.returned(*returned_folder(tmp_path, "a", 10))
    with outputs.predicting():
        assert alive(tmp_path) == set()
        outputs.returned(*returned_folder(tmp_path, "b", 10))
    assert alive(tmp_path) == {"b"}


@pytest.mark.parametrize(
    "name, unit", [("LCM_KEEP_OUTPUTS_S", "seconds"), ("LCM_KEEP_OUTPUTS_MB", r"megabytes \(10\^6 bytes\)")]
)
@pytest.mark.parametrize("value", ["-1", "ten", "inf", "nan"])
def test_a_bad_keep_outputs_setting_fails_setup_naming_it(monkeypatch, name, unit, value):
    import predict
    from lcm.errors import LCMError

    monkeypatch.setenv(name, value)
    with pytest.raises(
        LCMError, match=rf"^{name}='{value}' is not allowed: use a number of {unit}, 0 or more$"
    ):
        predict.Predictor().setup()


def test_a_download_no_prediction_takes_expires_with_its_file_and_a_recent_one_stays(tmp_path):
    """A request refused after Cog downloaded one of its inputs (another failed to download, say)
    never takes its record: once more than DOWNLOAD_RECORD_S old it goes with its file, which Cog
    leaves on disk then, while a younger record outlives any number of others."""
    import predict
    from lcm.errors import InputError

    clock = Clock()
    downloads = predict.Downloads(keep_s=600, clock=clock)

    def download(name: str) -> str:
        path = tmp_path / name
        path.write_bytes(b"an input")
        downloads.record(str(path))
        return str(path)

    refused = download("refused.png")
    clock.now = 300.0
    waiting = download("waiting.png")  # its request's other input is still downloading
    clock.now = 600.0
    downloads.take({"image": download("taken.png")})
    assert list(downloads.made) == [refused, waiting]  # 600 s old is not yet more than keep_s
    clock.now = 600.5
    for i in range(1000):  # other predictions, each taking its own download
        downloads.take({"image": download(f"{i}.png"), "mask": None})
    assert list(downloads.made) == [waiting]
    assert not (tmp_path / "refused.png").exists() and (tmp_path / "waiting.png").exists()
    downloads.take({"image": waiting})
    with pytest.raises(InputError, match=f"^mask='{refused}' is not allowed: an http"):
        downloads.take({"mask": refused})
    assert not downloads.made
