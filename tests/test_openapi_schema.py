"""The OpenAPI schema scripts/openapi-schema writes is the one `cog build` (0.23.1) would write,
describes predict.py as Cog's runtime reads it, and is what Cog's real server validates with.

Refresh the reviewed interface snapshot with `scripts/openapi-schema --snapshot`.
"""

from __future__ import annotations

import importlib.metadata
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


def _source(body: str, header: str = "", returns: str = "List[Path]") -> str:
    """A predictor whose predict() parameters are `body`."""
    return "\n".join(
        [
            "from typing import List, Optional",
            "from cog import BasePredictor, Input, Path",
            header,
            "class Predictor(BasePredictor):",
            "    def predict(",
            "        self,",
            textwrap.indent(body, " " * 8),
            f"    ) -> {returns}:",
            "        return []",
        ]
    )


def _generate(body: str, header: str = "") -> dict[str, Any]:
    """The document for _source(body, header), as written to disk."""
    return json.loads(cog_schema.dumps(cog_schema.generate_from_source(_source(body, header))))


def _input(body: str, header: str = "") -> dict[str, Any]:
    return _generate(body, header)["components"]["schemas"]["Input"]


def _assert_fails_naming(source: str, construct: str) -> None:
    """Generating from source fails with a message that names construct and the line it is on."""
    with pytest.raises(cog_schema.SchemaError) as raised:
        cog_schema.generate_from_source(source)
    message = str(raised.value)
    line = re.match(r"predict\.py:(\d+): ", message)
    assert line, message
    assert construct in message
    assert construct in source.split("\n")[int(line[1]) - 1], message


# --- the real predict.py -------------------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(cog_schema.dumps(cog_schema.generate(ROOT)))


@pytest.fixture(scope="module")
def runtime() -> Any:
    """predict.py's inputs as Cog's own Python inspector reads them when the server starts: it
    imports the predictor, which cog build (and so the generator) never does."""
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


@pytest.mark.parametrize(
    ("old", "new", "construct"),
    [
        (" image: Optional[Path]", " image: Dict[str, str]", "Dict[str, str]"),  # not control_image
        ("prompt: str", "prompt: Secret", "Secret"),
        ("seed: Optional[int]", "seed: int | None", "int | None"),
        (") -> List[Path]:", ") -> Iterator[Path]:", "Iterator[Path]"),
        ("default=DEFAULT_PROMPT", "default=DEFAULT_PROMPT.strip()", "DEFAULT_PROMPT.strip()"),
        ("OUTPUT_FORMATS = [", "OUTPUT_FORMATS = EXTRA + [", "EXTRA + ["),
    ],
)
def test_predict_py_using_what_the_generator_does_not_read_fails_naming_it(
    old: str, new: str, construct: str
) -> None:
    source = (ROOT / "predict.py").read_text()
    assert source.count(old) == 1, f"predict.py changed: update this test's {old!r}"
    _assert_fails_naming(source.replace(old, new), construct)


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
    assert schemas["Output"] == {
        "title": "Output",
        "type": "array",
        "items": {"type": "string", "format": "uri"},
    }


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
        'image: Optional[Path] = Input(description="Image."),'
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


def test_none_default_on_a_non_optional_type_is_required() -> None:
    """cog build turns `seed: int = Input(default=None)` into a required field with no default."""
    schema = _input("seed: int = Input(default=None),")
    assert schema["required"] == ["seed"]
    assert schema["properties"]["seed"] == {"title": "Seed", "type": "integer", "x-order": 0}


def test_module_constants_resolve() -> None:
    header = 'HELP = "Prompt."\nDEFAULT = "a cat"\nFORMATS = ["webp", "png"]\nSTEPS = 4'
    document = _generate(
        "prompt: str = Input(description=HELP, default=DEFAULT),\n"
        'output_format: str = Input(default="png", choices=FORMATS),\n'
        "steps: int = Input(default=STEPS),",
        header,
    )
    schemas = document["components"]["schemas"]
    assert schemas["Input"]["properties"]["prompt"]["description"] == "Prompt."
    assert schemas["Input"]["properties"]["prompt"]["default"] == "a cat"
    assert schemas["output_format"]["enum"] == ["webp", "png"]
    assert schemas["Input"]["properties"]["steps"]["default"] == 4


@pytest.mark.parametrize(
    ("body", "header", "construct"),
    [
        # types, defaults and Input() arguments predict.py does not use
        ("x: Dict[str, Any] = Input(default=None),", "", "Dict[str, Any]"),
        ("x: Path | None = None,", "", "Path | None"),
        ("x: List[Path],", "", "List[Path]"),
        ("x: Tensor,", "from torch import Tensor", "Tensor"),
        ("seed,", "", "seed"),
        ("x: int = 42,", "", "42"),
        ('x: str = cog.Input(default="a"),', "import cog", 'cog.Input(default="a")'),
        ('x: str = Input("a"),', "", 'Input("a")'),
        ("x: str = Input(min_length=1),", "", "min_length"),
        ("x: str = Input(default_factory=list),", "", "default_factory"),
        ('x: str = Input(default=["a"]),', "", '["a"]'),
        ('x: str = Input(default="a", choices=("a", "b")),', "", '("a", "b")'),
        # values cog build cannot resolve statically
        ('x: str = Input(default=os.environ.get("X")),', "import os", 'os.environ.get("X")'),
        ("x: int = Input(default=LIMIT * 2),", "LIMIT = 4", "LIMIT * 2"),
        ("x: int = Input(default=UNKNOWN),", "", "UNKNOWN"),
        ("x: int = Input(default=LIMIT),", "LIMIT = 4\nLIMIT = 5", "LIMIT"),
        ("x: int = Input(default=LIMIT),", "LIMIT = compute()", "compute()"),
        # values cog build would silently drop or read otherwise than Python
        ("x: int = Input(default=4, ge=LOW),", "LOW = 1", "LOW"),
        ("x: int = Input(default=4, ge=-1),", "", "-1"),
        ("x: int = Input(default=4, ge=(1)),", "", "(1)"),
        ('x: str = Input(description="\u00e9", default=("a")),', "", '("a")'),
        ("x: int = Input(default=1_000),", "", "1_000"),
        ("x: float = Input(default=0.00001),", "", "0.00001"),
        ('x: str = Input(description=("a " "b")),', "", '("a " "b")'),
        ('x: str = Input(description="a " "b"),', "", '"a " "b"'),
        ('x: str = Input(description="tab\\there"),', "", '"tab\\there"'),
    ],
)
def test_what_the_generator_does_not_read_fails_naming_it(body: str, header: str, construct: str) -> None:
    _assert_fails_naming(_source(body, header), construct)


@pytest.mark.parametrize(
    ("source", "construct"),
    [
        ("class Predictor:\n    def predict(self) -> Iterator[Path]: ...\n", "Iterator[Path]"),
        ("class Predictor:\n    def predict(self) -> str: ...\n", "str"),
        ("class Predictor:\n    async def run(self) -> List[Path]: ...\n", "async def run"),
        ("class Predictor:\n    def run(self) -> List[Path]: ...\n", "def run"),
        ("class Predictor:\n    def predict(self, *, x: int) -> List[Path]: ...\n", "*"),
        ("class Predictor:\n    def run(self) -> str: ...\n    def predict(self) -> str: ...\n", "def run"),
    ],
)
def test_predictor_shapes_the_generator_does_not_read_fail_naming_them(source: str, construct: str) -> None:
    _assert_fails_naming(source, construct)


def test_json_is_written_the_way_go_writes_it() -> None:
    """cog build's Go writes whole floats without `.0`, HTML-safe strings, and sorted keys except in
    its ordered maps: byte-compatible output keeps diffs against it empty."""
    ordered = cog_schema._Ordered(b=1, a=2)
    value = {"z": [8.0, 0.8, 0.0001, 4294967295.0, 7, None, True], "a": "<&>\u2028", "m": ordered}
    assert cog_schema.dumps(value) == (
        '{"a":"\\u003c\\u0026\\u003e\\u2028","m":{"b":1,"a":2},"z":[8,0.8,0.0001,4294967295,7,null,true]}'
    )
    assert cog_schema.dumps({"b": [], "a": {}}, indent=2) == '{\n  "a": {},\n  "b": []\n}'
    with pytest.raises(ValueError, match="Go writes"):
        cog_schema.dumps(0.00001)  # Go: 0.00001, Python: 1e-05


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
