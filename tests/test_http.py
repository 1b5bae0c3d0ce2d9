"""The service as users reach it: Cog's real HTTP server, real HTTP, the tiny checkpoint."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from cogserver import CogServer

SMALL = {"width": 256, "height": 256, "num_inference_steps": 2}


def png_images(output: list[str]) -> list[tuple[bytes, Image.Image]]:
    result = []
    for url in output:
        head, _, data = url.partition(",")
        assert head == "data:image/png;base64", head
        raw = base64.b64decode(data)
        result.append((raw, Image.open(io.BytesIO(raw))))
    return result


def test_prediction_returns_requested_pngs(server):
    status, body = server.predict(
        prompt="a red fox", num_images=2, seed=7, width=320, height=256, num_inference_steps=2
    )
    assert status == 200 and body["status"] == "succeeded", body
    images = png_images(body["output"])
    assert len(images) == 2
    for raw, image in images:
        assert raw.startswith(b"\x89PNG") and image.format == "PNG"
        assert image.size == (320, 256) and image.mode == "RGB"
    assert "seed=7" in body["logs"] and "size=320x256" in body["logs"]


def test_same_seed_same_bytes_other_seed_other_image(server):
    first = server.predict(prompt="a red fox", seed=11, **SMALL)[1]
    again = server.predict(prompt="a red fox", seed=11, **SMALL)[1]
    other = server.predict(prompt="a red fox", seed=12, **SMALL)[1]
    assert first["output"] == again["output"]
    assert png_images(first["output"])[0][1].tobytes() != png_images(other["output"])[0][1].tobytes()


def test_missing_seed_is_random_and_logged(server):
    """Two requests without a seed get different images; the logged seed regenerates each."""
    first, second = (server.predict(prompt="a red fox", **SMALL)[1] for _ in range(2))
    assert first["status"] == second["status"] == "succeeded"
    assert png_images(first["output"])[0][1].tobytes() != png_images(second["output"])[0][1].tobytes()
    seed = int(re.search(r"\bseed=(\d+)", first["logs"]).group(1))
    again = server.predict(prompt="a red fox", seed=seed, **SMALL)[1]
    assert png_images(again["output"])[0][1].tobytes() == png_images(first["output"])[0][1].tobytes()


def test_a_drawn_seed_spans_the_32_bit_range():
    """The seed the server draws for a request without one (Request.build): 20 draws all differ
    and reach the upper half of the range (a 31-bit draw would fail with probability 1)."""
    from lcm.params import Request

    seeds = [Request.build("x", width=256, height=256).seed for _ in range(20)]
    assert len(set(seeds)) == 20 and max(seeds) >= 2**31 and all(0 <= s < 2**32 for s in seeds)


def test_width_out_of_range_is_refused_by_the_schema(server):
    status, body = server.predict(prompt="x", width=100)
    assert status == 422
    assert body["detail"][0]["loc"][-1] == "width"
    assert "256" in body["detail"][0]["msg"]
    assert server.predict(prompt="x", **SMALL)[1]["status"] == "succeeded"


def test_width_not_multiple_of_8_fails_with_a_clear_message(server):
    status, body = server.predict(prompt="x", width=777, height=256)
    assert status == 200 and body["status"] == "failed"
    assert "width=777" in body["error"] and "multiple of 8" in body["error"] and "776 or 784" in body["error"]
    assert server.predict(prompt="x", **SMALL)[1]["status"] == "succeeded"


def test_origin_steps_below_steps_fails_clearly(server):
    body = server.predict(prompt="x", num_inference_steps=8, lcm_origin_steps=4, width=256, height=256)[1]
    assert body["status"] == "failed"
    assert "lcm_origin_steps=4" in body["error"] and "num_inference_steps=8" in body["error"]


def test_openapi_lists_every_input_with_bounds(server):
    import inspect

    import predict

    status, spec = server.request("GET", "/openapi.json")
    assert status == 200
    props = spec["components"]["schemas"]["Input"]["properties"]
    names = [n for n in inspect.signature(predict.Predictor.predict).parameters if n != "self"]
    assert sorted(props) == sorted(names)
    assert props["width"]["minimum"] == 256 and props["width"]["maximum"] == 1024
    assert props["num_images"]["minimum"] == 1 and props["num_images"]["maximum"] == 8
    assert props["num_inference_steps"]["maximum"] == 50
    assert props["guidance_scale"]["minimum"] == 1 and props["guidance_scale"]["maximum"] == 20
    assert props["seed"]["minimum"] == 0 and props["seed"]["maximum"] == 4294967295
    assert "seed" not in spec["components"]["schemas"]["Input"].get("required", [])
    for name in names:
        assert props[name].get("description"), name


@pytest.fixture
def empty_weights_server(tmp_path, openapi_schema):
    srv = CogServer(tmp_path, openapi_schema)
    yield srv
    srv.stop()


def test_empty_weights_dir_gives_setup_failed_with_the_fix(empty_weights_server, tmp_path):
    health = empty_weights_server.wait_until({"SETUP_FAILED", "READY"})
    assert health["status"] == "SETUP_FAILED"
    logs = health["setup"]["logs"]
    assert str(tmp_path) in logs and "unet/diffusion_pytorch_model.safetensors" in logs
    assert "download-weights" in logs
    status, _ = empty_weights_server.predict(prompt="x")
    assert status == 503
