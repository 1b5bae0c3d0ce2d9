"""The OpenAPI schema scripts/openapi-schema writes is the one `cog build` (0.23.1) would write,
describes predict.py as Cog's runtime reads it, and is what Cog's real server validates with.

Refresh the reviewed interface snapshot with `scripts/openapi-schema --snapshot`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterator

import pytest

from cogserver import cog_schema_module

ROOT = Path(__file__).resolve().parent.parent


cog_schema = cog_schema_module()


def _generate(body: str, header: str = "") -> dict[str, Any]:
    """The document for a predictor whose predict() parameters are `body`, as written to disk."""
    source = "\n".join(
        [
            "from typing import List, Optional",
            "from cog import BasePredictor, Input, Path",
            header,
            "class Predictor(BasePredictor):",
            "    def predict(",
            "        self,",
            textwrap.indent(body, " " * 8),
            "    ) -> str:",
            "        return ''",
        ]
    )
    return json.loads(cog_schema.dumps(cog_schema.generate_from_source(source, "Predictor")))


def _input(body: str, header: str = "") -> dict[str, Any]:
    return _generate(body, header)["components"]["schemas"]["Input"]


def _error(body: str, header: str = "") -> str:
    with pytest.raises(cog_schema.SchemaError) as raised:
        _generate(body, header)
    return str(raised.value)


# --- the real predict.py -------------------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(cog_schema.dumps(cog_schema.generate(ROOT)))


@pytest.fixture(scope="module")
def runtime() -> Any:
    """predict.py's inputs as Cog's own Python inspector reads them when the server starts."""
    from cog import _inspector

    sys.path.insert(0, str(ROOT))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return _inspector.create_predictor("predict", "Predictor")
    finally:
        sys.path.remove(str(ROOT))


def test_inputs_match_the_signature_cog_runs(document: dict[str, Any], runtime: Any) -> None:
    from cog._adt import Repetition

    schemas = document["components"]["schemas"]
    properties = schemas["Input"]["properties"]
    assert list(properties) == list(runtime.inputs)
    for name, field in runtime.inputs.items():
        prop = properties[name]
        type_schema = field.type.json_type()
        assert prop["x-order"] == field.order, name
        if field.choices is None:
            assert {key: prop.get(key) for key in type_schema} == type_schema, name
        else:
            assert prop["allOf"] == [{"$ref": f"#/components/schemas/{name}"}], name
            assert schemas[name]["enum"] == field.choices, name
            assert schemas[name]["type"] == type_schema["type"], name
        optional = field.type.repetition in (Repetition.OPTIONAL, Repetition.OPTIONAL_REPEATED)
        assert prop.get("nullable", False) is optional, name
        assert prop.get("default") == field.default, name
        assert prop.get("description") == field.description, name
        assert prop.get("minimum") == field.ge, name
        assert prop.get("maximum") == field.le, name
    required = [
        name
        for name, field in runtime.inputs.items()
        if field.default is None and field.type.repetition in (Repetition.REQUIRED, Repetition.REPEATED)
    ]
    assert schemas["Input"].get("required", []) == required


def test_output_matches_the_return_type_cog_runs(document: dict[str, Any], runtime: Any) -> None:
    assert document["components"]["schemas"]["Output"] == runtime.output.json_type()


def test_every_input_is_described_and_bounded(document: dict[str, Any]) -> None:
    """Style: each input says what it means, and numbers cannot be sent out of range."""
    for name, prop in document["components"]["schemas"]["Input"]["properties"].items():
        assert prop.get("description"), name
        if prop.get("type") in ("integer", "number"):
            assert "minimum" in prop and "maximum" in prop, name


def test_input_interface_matches_the_reviewed_snapshot() -> None:
    snapshot = ROOT / cog_schema.SNAPSHOT
    expected = snapshot.read_text() if snapshot.exists() else ""
    actual = cog_schema.input_snapshot(cog_schema.generate(ROOT))
    assert actual == expected, (
        f"predict.py's public inputs changed. If that is intended, run {cog_schema.REFRESH_HINT}.\n"
        + cog_schema.snapshot_diff(expected, actual)
    )


# --- the generator, on small predictors ------------------------------------------------------


def test_document_has_cog_builds_shape() -> None:
    document = _generate("prompt: str,")
    schemas = document["components"]["schemas"]
    assert document["openapi"] == "3.0.2"
    assert document["info"] == {"title": "Cog", "version": importlib.metadata.version("cog")}
    assert list(document["paths"]) == [
        "/",
        "/health-check",
        "/predictions",
        "/predictions/{prediction_id}/cancel",
    ]
    assert list(schemas) == [
        "Input",
        "Output",
        "PredictionRequest",
        "PredictionResponse",
        "Status",
        "HTTPValidationError",
        "ValidationError",
    ]
    assert schemas["Input"] == {
        "title": "Input",
        "type": "object",
        "properties": {"prompt": {"title": "Prompt", "type": "string", "x-order": 0}},
        "required": ["prompt"],
    }
    assert schemas["Output"] == {"title": "Output", "type": "string"}


def test_bounds_defaults_and_titles() -> None:
    prop = _input('num_inference_steps: int = Input(description="Steps.", default=4, ge=1, le=50),')[
        "properties"
    ]
    assert prop["num_inference_steps"] == {
        "title": "Num Inference Steps",
        "type": "integer",
        "default": 4,
        "description": "Steps.",
        "minimum": 1,
        "maximum": 50,
        "x-order": 0,
    }


def test_choices_become_an_enum_component_referenced_through_all_of() -> None:
    document = _generate(
        'output_format: str = Input(default="webp", choices=["webp", "png"]),\n'
        "clip_skip: int = Input(default=0, choices=[0, 1, 2]),"
    )
    schemas = document["components"]["schemas"]
    assert schemas["Input"]["properties"]["output_format"] == {
        "allOf": [{"$ref": "#/components/schemas/output_format"}],
        "default": "webp",
        "x-order": 0,
    }
    assert schemas["output_format"] == {
        "title": "output_format",
        "description": "An enumeration.",
        "enum": ["webp", "png"],
        "type": "string",
    }
    assert schemas["clip_skip"]["enum"] == [0, 1, 2] and schemas["clip_skip"]["type"] == "integer"
    assert list(schemas)[:4] == ["Input", "Output", "output_format", "clip_skip"]


def test_optional_inputs_are_nullable_and_never_required() -> None:
    schema = _input(
        'seed: Optional[int] = Input(description="Seed.", default=None, ge=0, le=4294967295),\n'
        'image: Optional[Path] = Input(description="Image."),\n'
        "mask: Path | None = None,"
    )
    assert "required" not in schema
    assert schema["properties"]["seed"] == {
        "title": "Seed",
        "type": "integer",
        "default": None,
        "nullable": True,
        "description": "Seed.",
        "minimum": 0,
        "maximum": 4294967295,
        "x-order": 0,
    }
    assert schema["properties"]["image"] == {
        "title": "Image",
        "type": "string",
        "format": "uri",
        "nullable": True,
        "description": "Image.",
        "x-order": 1,
    }
    assert schema["properties"]["mask"]["default"] is None


def test_none_default_on_a_non_optional_type_is_required() -> None:
    """cog build turns `seed: int = Input(default=None)` into a required field with no default."""
    schema = _input("seed: int = Input(default=None),")
    assert schema["required"] == ["seed"]
    assert schema["properties"]["seed"] == {"title": "Seed", "type": "integer", "x-order": 0}


def test_module_constants_resolve() -> None:
    header = 'HELP = "Prompt."\nDEFAULT: str = "a cat"\nFORMATS = ["webp", "png"]\nMORE = ("jpg",)\nSTEPS = 4'
    document = _generate(
        "prompt: str = Input(description=HELP, default=DEFAULT),\n"
        'output_format: str = Input(default="png", choices=FORMATS + MORE),\n'
        "steps: int = STEPS,",
        header,
    )
    schemas = document["components"]["schemas"]
    assert schemas["Input"]["properties"]["prompt"]["description"] == "Prompt."
    assert schemas["Input"]["properties"]["prompt"]["default"] == "a cat"
    assert schemas["output_format"]["enum"] == ["webp", "png", "jpg"]
    assert schemas["Input"]["properties"]["steps"]["default"] == 4


def test_lists_of_paths_in_and_out() -> None:
    source = textwrap.dedent(
        """
        from cog import BasePredictor, Path

        class Predictor(BasePredictor):
            def predict(self, images: list[Path]) -> list[Path]:
                return images
        """
    )
    schemas = cog_schema.generate_from_source(source, "Predictor")["components"]["schemas"]
    assert schemas["Input"]["properties"]["images"]["items"] == {"type": "string", "format": "uri"}
    assert schemas["Output"] == {
        "title": "Output",
        "type": "array",
        "items": {"type": "string", "format": "uri"},
    }


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        ('x: str = Input(default=os.environ.get("X")),', "import os", "cannot statically resolve"),
        ("x: int = Input(default=LIMIT * 2),", "LIMIT = 4", "cannot statically resolve"),
        ("x: int = Input(default=UNKNOWN),", "", "`UNKNOWN` is not assigned"),
        ("x: int = Input(default=LIMIT),", "LIMIT = 4\nLIMIT = 5", "assigned 2 times"),
        ("x: int = Input(default=LIMIT),", "LIMIT = compute()", "cannot statically resolve"),
        ("x: int = Input(default=4, ge=LOW),", "LOW = 1", "silently drop"),
        ("x: int = Input(default=4, ge=(1)),", "", "silently drop"),
        ('x: str = Input(description=("a " "b")),', "", "parentheses"),
        ('x: str = Input(description="a " "b"),', "", "verbatim"),
        ('x: str = Input(description="tab\\there"),', "", "verbatim"),
        ('x: str = Input(description=f"{1}"),', "", "cannot statically resolve"),
        ('x: str = cog.Input(default="a"),', "import cog", "from cog import Input"),
        ('x: str = Input("a"),', "", "keyword arguments only"),
        ("x: int = Input(default=4, min_length=1),", "", "not supported"),
        ("x: str = Input(default_factory=list),", "", "default_factory"),
        (
            'x: str = Input(default="a", choices=tuple(NAMES)),',
            "NAMES = ['a', 'b']",
            "cannot statically resolve",
        ),
        ("x: int = Input(default=100, ge=1, le=50),", "", "outside"),
        ('x: str = Input(default="gif", choices=["webp", "png"]),', "", "not one of the choices"),
        ("x: int = Input(default=1, choices=[1, 2], ge=1),", "", "mutually exclusive"),
        ('x: str = Input(default="a", choices=["a"]),', "", "at least 2"),
        ('x: int = Input(default="4"),', "", "not a valid int"),
        ("x,", "", "no type annotation"),
        ("x: Optional[int | str] = None,", "", "only `X | None`"),
        ("x: Tensor,", "from torch import Tensor", "imported from 'torch'"),
    ],
)
def test_what_cog_build_would_reject_or_misread_fails_clearly(body: str, header: str, message: str) -> None:
    error = _error(body, header)
    assert message in error
    assert re.match(r"predict\.py:\d+: ", error), error


def test_unsupported_predictor_shapes_fail_clearly() -> None:
    with pytest.raises(cog_schema.SchemaError, match="Optional and unions are not allowed"):
        cog_schema.generate_from_source("class P:\n    def predict(self) -> str | None: ...\n", "P")
    with pytest.raises(cog_schema.SchemaError, match="both run"):
        cog_schema.generate_from_source(
            "class P:\n    def run(self) -> str: ...\n    def predict(self) -> str: ...\n", "P"
        )
    with pytest.raises(cog_schema.SchemaError, match="not found"):
        cog_schema.generate_from_source("class P: ...\n", "Predictor")
    with pytest.raises(cog_schema.SchemaError, match="invalid predictor reference"):
        cog_schema.generate(ROOT, "predict:Predictor")


def test_json_is_written_the_way_go_writes_it() -> None:
    """cog build's Go writes shortest floats without exponents in [1e-6, 1e21), HTML-safe strings,
    sorted keys except its ordered maps: byte-compatible output keeps diffs against it empty."""
    ordered = cog_schema._Ordered(b=1, a=2)
    value = {"z": [8.0, 0.8, 1e-05, 1e21, -1.5e-07, 4294967295.0, 7], "a": "<&>", "m": ordered}
    assert cog_schema.dumps(value) == (
        '{"a":"\\u003c\\u0026\\u003e","m":{"b":1,"a":2},"z":[8,0.8,0.00001,1e+21,-1.5e-7,4294967295,7]}'
    )


# --- the command line and the real server ----------------------------------------------------

DUMMY = """
from typing import List, Optional

from cog import BasePredictor, Input, Path


class Predictor(BasePredictor):
    def predict(
        self,
        width: int = Input(description="Width.", default=768, ge=256, le=1024),
        output_format: str = Input(description="Format.", default="png", choices=["png", "webp"]),
        seed: Optional[int] = Input(description="Seed.", default=None, ge=0, le=4294967295),
    ) -> List[Path]:
        out = Path("out.txt")
        out.write_text(f"{width} {output_format} {seed}")
        return [out]
"""


def test_cli_writes_the_schema_and_reports_errors(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "openapi-schema"
    (tmp_path / "predict.py").write_text(DUMMY)
    done = subprocess.run([script, "--root", tmp_path], capture_output=True, text=True, check=True)
    written = tmp_path / ".cog" / "openapi_schema.json"
    assert str(written) in done.stdout
    assert (
        json.loads(written.read_text())["components"]["schemas"]["Input"]["properties"]["width"]["maximum"]
        == 1024
    )
    (tmp_path / "predict.py").write_text(DUMMY.replace("ge=256", "ge=MIN_WIDTH"))
    failed = subprocess.run([script, "--root", tmp_path], capture_output=True, text=True)
    assert failed.returncode == 1
    assert "predict.py:" in failed.stderr and "'width'" in failed.stderr and "MIN_WIDTH" in failed.stderr


@pytest.fixture
def dummy_server(tmp_path: Path) -> Iterator[str]:
    """Cog's real HTTP server (coglet) on a free port, serving DUMMY with its generated schema."""
    (tmp_path / "predict.py").write_text(DUMMY)
    assert cog_schema.main(["--root", str(tmp_path)]) == 0
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PORT": "0"}
    env["COG_PREDICT_TYPE_STUB"] = "predict.py:Predictor"
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield _wait_until_ready(log, process)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _wait_until_ready(log: Path, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        port = re.search(r"Starting coglet server on 127\.0\.0\.1:(\d+)", log.read_text())
        if port:
            url = f"http://127.0.0.1:{port[1]}"
            try:
                with urllib.request.urlopen(f"{url}/health-check", timeout=5) as response:
                    if json.load(response)["status"] == "READY":
                        return url
            except urllib.error.URLError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready in 60 s:\n{log.read_text()}")


def _post(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/predictions", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_real_server_serves_and_enforces_the_generated_schema(dummy_server: str, tmp_path: Path) -> None:
    with urllib.request.urlopen(f"{dummy_server}/openapi.json", timeout=10) as response:
        assert json.load(response) == json.loads((tmp_path / ".cog" / "openapi_schema.json").read_text())
    status, body = _post(dummy_server, {"input": {"width": 2048}})
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "input", "width"]
    assert "maximum of 1024" in body["detail"][0]["msg"]
    status, body = _post(dummy_server, {"input": {"output_format": "gif"}})
    assert status == 422 and body["detail"][0]["loc"] == ["body", "input", "output_format"]
    status, body = _post(dummy_server, {"input": {"seed": 7}})
    assert status == 200 and body["status"] == "succeeded", body
