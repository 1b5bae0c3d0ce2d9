"""Write the OpenAPI schema that `cog build` (Cog 0.23.1) writes to .cog/openapi_schema.json.

Cog's server (coglet) validates requests and serves /openapi.json only from that file, and
`cog build` needs Docker, which our machines lack. The build reads predict.py statically
(replicate/cog pkg/schema: tree-sitter, no import); this module does the same with Python's ast
and writes the same bytes, so the schema can be generated, served and tested anywhere.

It reads only what predict.py uses: parameters typed str, int, float, bool or cog's Path, each
maybe Optional[...]; `Input(description=, default=, ge=, le=, choices=)` whose values are plain
literals or module-level constants; a List[Path] return type. Anything else fails, naming the
construct and its line, rather than guessing what cog build makes of it (some of it cog build
would silently drop or misread). To use more, extend this module and check its output against
cog build.

It never imports predict.py, as cog build never does, and imports only the standard library, so
scripts/openapi-schema runs under any python3. Cog's own inspector (cog._inspector) imports the
predictor, as the server does at setup: tests/test_openapi_schema.py holds this output to it, and
it enforces Cog's runtime rules (bounds only on numbers, a default within its bounds, ...).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import io
import json
import os
import re
import sys
import tempfile
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

COG_VERSION = "0.23.1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PREDICTOR = "predict.py:Predictor"
DEFAULT_OUT = Path(".cog/openapi_schema.json")
SNAPSHOT = Path("tests/snapshots/openapi_input.json")
REFRESH_HINT = f"scripts/openapi-schema --snapshot (then review and commit {SNAPSHOT})"

# The input types predict.py uses, with their JSON schema (cog pkg/schema/types.go JSONType).
_TYPES: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "Path": {"type": "string", "format": "uri"},
}
_OUTPUT = "List[Path]"
# A number as both Python and cog build's Go read it: plain digits, maybe a fraction. Go writes a
# whole float as an int, and one that is not whole as Python does when it is at least _MIN_FRACTION.
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")
_MIN_FRACTION = 1e-4
_NO_DEFAULT = object()
_UNSUPPORTED = "not supported by scripts/cog_schema.py"


class SchemaError(Exception):
    """predict.py uses something this generator does not read, or cannot be read at all."""


class _Ordered(dict):
    """A JSON object written in insertion order (cog's orderedMapAny); plain dicts are written
    with sorted keys, as Go writes its maps."""


@dataclass
class _Field:
    """One predict() parameter with the Input() settings cog build reads."""

    name: str
    schema: dict[str, Any]
    nullable: bool
    default: Any = _NO_DEFAULT
    description: str | None = None
    ge: float | None = None
    le: float | None = None
    choices: list[Any] | None = None


class _Source:
    """predict.py parsed once: its ast, its module-level constants, and where parentheses open."""

    def __init__(self, text: str, filename: str) -> None:
        self.text = text.replace("\r\n", "\n")
        self.filename = filename
        self.lines = self.text.split("\n")
        try:
            self.tree = ast.parse(self.text, filename)
        except SyntaxError as exc:
            raise SchemaError(f"{filename}:{exc.lineno}: cannot parse: {exc.msg}") from exc
        # tree-sitter keeps `(value)` as a node cog build cannot read; the ast drops the parentheses,
        # so note each token that follows a "(".
        self.after_paren: set[tuple[int, int]] = set()
        previous = ""
        for token in tokenize.generate_tokens(io.StringIO(self.text).readline):
            if token.type in (tokenize.OP, tokenize.NAME, tokenize.NUMBER, tokenize.STRING):
                if previous == "(":
                    self.after_paren.add(token.start)
                previous = token.string if token.type == tokenize.OP else ""
        # Every top-level binding of a name: its value where it is a plain `NAME = value`, else None.
        self.constants: dict[str, list[ast.expr | None]] = {}
        for stmt in self.tree.body:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                plain = (
                    isinstance(stmt, ast.Assign) and len(targets) == 1 and isinstance(targets[0], ast.Name)
                )
                for name in (node for target in targets for node in ast.walk(target)):
                    if isinstance(name, ast.Name):
                        self.constants.setdefault(name.id, []).append(stmt.value if plain else None)

    def error(self, node: ast.AST, message: str) -> SchemaError:
        return SchemaError(f"{self.filename}:{node.lineno}: {message}")

    def source(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ""

    def value(self, node: ast.AST, what: str, in_list: bool = False) -> Any:
        """A literal (in_list: a list of them), or a module-level constant holding one."""
        if isinstance(node, ast.Name) and not self._parenthesized(node):
            values = self.constants.get(node.id, [])
            if len(values) != 1 or values[0] is None:
                raise self.error(
                    node,
                    f"{what}: `{node.id}` is not a constant: cog build resolves only a name assigned "
                    f"once at the top level of {self.filename}, as `{node.id} = <literal>`",
                )
            return self.literal(values[0], f"{what} (constant {node.id})", in_list)
        return self.literal(node, what, in_list)

    def literal(self, node: ast.AST, what: str, in_list: bool = False) -> Any:
        """A str, int, float, bool or None literal (in_list: a list of them), written so that cog
        build (pkg/schema/python/literals.go) reads the value Python does."""
        text = self.source(node)
        if self._parenthesized(node):
            raise self.error(node, f"{what}: cog build cannot read `({text})`; remove the parentheses")
        if in_list and isinstance(node, ast.List):
            return [self.literal(item, what) for item in node.elts]
        value = node.value if isinstance(node, ast.Constant) and not in_list else _NO_DEFAULT
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str) and text in (f'"{value}"', f"'{value}'"):
            return value
        if isinstance(value, str):
            raise self.error(
                node,
                f"{what}: write `{text}` as one plain string literal: cog build copies a string's "
                "source verbatim, decoding no escapes, prefixes or implicit concatenation",
            )
        if type(value) in (int, float) and _NUMBER.fullmatch(text) and value < 2**63:
            if value == int(value) or value >= _MIN_FRACTION:
                return value
        if type(value) in (int, float):
            raise self.error(
                node,
                f"{what}: write `{text}` as plain decimal digits, below 2**63 and, unless whole, at least "
                f"{_MIN_FRACTION}: cog build reads and writes numbers as Go does, and this generator "
                "matches it only there",
            )
        raise self.error(
            node,
            f"{what}: `{text}` is {_UNSUPPORTED}, which reads "
            + ("a list of literals" if in_list else "a str, int, float, bool or None literal")
            + " or a module-level constant holding one",
        )

    def description(self, node: ast.AST, what: str) -> str:
        value = self.value(node, what)
        if not isinstance(value, str):
            raise self.error(node, f"{what}: must be a string, not `{self.source(node)}`")
        return value

    def bound(self, node: ast.AST, what: str) -> float:
        """ge= or le=: cog build reads only a number literal and silently drops anything else."""
        if not (isinstance(node, ast.Constant) and type(node.value) in (int, float)):
            raise self.error(
                node,
                f"{what}: write a plain number literal, not `{self.source(node)}`: cog build reads bounds "
                "only as literals and silently drops others, so the server would not enforce this one",
            )
        return float(self.literal(node, what))

    def choices(self, node: ast.AST, what: str) -> list[Any]:
        return self.value(node, what, in_list=True)

    def _parenthesized(self, node: ast.AST) -> bool:
        # The ast counts columns in UTF-8 bytes, tokenize in characters.
        column = len(self.lines[node.lineno - 1].encode()[: node.col_offset].decode())
        return (node.lineno, column) in self.after_paren


def _predict_method(source: _Source, class_name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The predictor class's `def predict` or `async def predict`, the forms of predictor method read here."""
    classes = [
        node for node in source.tree.body if isinstance(node, ast.ClassDef) and node.name == class_name
    ]
    if len(classes) != 1:
        raise SchemaError(f"{source.filename}: class {class_name} is not defined once at its top level")
    methods = [
        node
        for node in classes[0].body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in ("run", "predict")
    ]
    method = methods[0] if methods else classes[0]
    if len(methods) != 1 or method.name != "predict":
        found = [
            f"`{'async def' if isinstance(m, ast.AsyncFunctionDef) else 'def'} {m.name}`" for m in methods
        ]
        raise source.error(
            method,
            f"{class_name} defines {', '.join(found) or 'no predict()'}: scripts/cog_schema.py reads "
            "exactly one `def predict(self, ...)` or `async def predict(self, ...)`, and not run()",
        )
    args = method.args
    plain = [arg.arg for arg in args.args[:1]] == ["self"]
    if method.decorator_list or args.posonlyargs or args.vararg or args.kwonlyargs or args.kwarg or not plain:
        raise source.error(
            method,
            f"predict(): decorators, /, *, *args and **kwargs are {_UNSUPPORTED}; "
            "take self, then plain parameters",
        )
    return method


def _fields(source: _Source, method: ast.FunctionDef | ast.AsyncFunctionDef) -> list[_Field]:
    params = method.args.args[1:]  # after self
    defaults = [None] * (len(params) - len(method.args.defaults)) + method.args.defaults
    return [_field(source, param, default) for param, default in zip(params, defaults, strict=True)]


def _field(source: _Source, param: ast.arg, default: ast.expr | None) -> _Field:
    what = f"parameter '{param.arg}'"
    if param.annotation is None:
        raise source.error(param, f"{what} has no type annotation")
    annotation = ast.unparse(param.annotation)
    optional = annotation.startswith("Optional[") and annotation.endswith("]")
    inner = annotation[len("Optional[") : -1] if optional else annotation
    if inner not in _TYPES:
        raise source.error(
            param,
            f"{what}: type `{annotation}` is {_UNSUPPORTED}, which reads {', '.join(_TYPES)} "
            "and Optional[...] of them",
        )
    field = _Field(param.arg, dict(_TYPES[inner]), optional)
    if default is None:
        return field
    if not (isinstance(default, ast.Call) and source.source(default.func) == "Input") or default.args:
        raise source.error(
            default,
            f"{what}: default `{source.source(default)}` is {_UNSUPPORTED}: write "
            "Input(default=..., ...) with keyword arguments",
        )
    readers: dict[str, Callable[[ast.AST, str], Any]] = {
        "description": source.description,
        "default": source.value,
        "ge": source.bound,
        "le": source.bound,
        "choices": source.choices,
    }
    for keyword in default.keywords:
        if keyword.arg not in readers:
            raise source.error(
                keyword,
                f"{what}: Input({keyword.arg or '**'}=...) is {_UNSUPPORTED}, "
                f"which reads {', '.join(readers)}",
            )
        setattr(field, keyword.arg, readers[keyword.arg](keyword.value, f"{what}: {keyword.arg}"))
    return field


def _output(source: _Source, method: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, Any]:
    """The Output component: cog build's JSON schema of the return type (pkg/schema/schema_type.go)."""
    returns = method.returns
    if returns is None or ast.unparse(returns) != _OUTPUT:
        written = "none" if returns is None else f"`{ast.unparse(returns)}`"
        raise source.error(
            returns or method, f"return type {written} is {_UNSUPPORTED}, which reads {_OUTPUT}"
        )
    return {"title": "Output", "type": "array", "items": dict(_TYPES["Path"])}


def _title(name: str) -> str:
    """snake_case -> Title Case, as cog's TitleCase does."""
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _input_schema(fields: list[_Field]) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """The Input component and one enum component per choices field (openapi_spec.go buildInputSchema)."""
    properties = _Ordered()
    required: list[str] = []
    enums: list[tuple[str, dict[str, Any]]] = []
    for order, field in enumerate(fields):
        prop: dict[str, Any] = {"x-order": order}
        if field.choices is not None:
            enum = {
                "title": field.name,
                "description": "An enumeration.",
                "enum": field.choices,
                "type": field.schema["type"],
            }
            enums.append((field.name, enum))
            prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
        else:
            prop["title"] = _title(field.name)
            prop.update(field.schema)
        nullable = field.nullable
        # A None default on a non-Optional type is no default: cog makes the field required.
        has_default = field.default is not _NO_DEFAULT and (field.default is not None or nullable)
        if not has_default and not nullable:
            required.append(field.name)
        if has_default:
            prop["default"] = field.default
        if nullable:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        if field.ge is not None:
            prop["minimum"] = field.ge
        if field.le is not None:
            prop["maximum"] = field.le
        properties[field.name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema, enums


def _responses(ok_schema: dict[str, Any], with_validation_error: bool = True) -> dict[str, Any]:
    responses = {
        "200": {"description": "Successful Response", "content": {"application/json": {"schema": ok_schema}}}
    }
    if with_validation_error:
        error_ref = {"$ref": "#/components/schemas/HTTPValidationError"}
        responses["422"] = {
            "description": "Validation Error",
            "content": {"application/json": {"schema": error_ref}},
        }
    return responses


def _document(fields: list[_Field], output: dict[str, Any]) -> dict[str, Any]:
    """The whole OpenAPI 3.0.2 document (openapi_spec.go buildOpenAPISpec, predict mode)."""
    input_schema, enums = _input_schema(fields)
    input_ref = {"$ref": "#/components/schemas/Input"}
    date_time = {"type": "string", "format": "date-time"}
    schemas = _Ordered(Input=input_schema, Output=output)
    schemas.update(enums)
    schemas["PredictionRequest"] = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {"id": {"title": "Id", "type": "string"}, "input": input_ref},
    }
    schemas["PredictionResponse"] = {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": input_ref,
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", "type": "string"},
            "version": {"title": "Version", "type": "string"},
            "created_at": {"title": "Created At", **date_time},
            "started_at": {"title": "Started At", **date_time},
            "completed_at": {"title": "Completed At", **date_time},
            "status": {"title": "Status", "type": "string"},
            "error": {"title": "Error", "type": "string"},
            "logs": {"title": "Logs", "type": "string"},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    schemas["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    schemas["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {
                "title": "Detail",
                "type": "array",
                "items": {"$ref": "#/components/schemas/ValidationError"},
            }
        },
    }
    schemas["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {
                "title": "Location",
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            },
            "msg": {"title": "Message", "type": "string"},
            "type": {"title": "Error Type", "type": "string"},
        },
    }
    paths = _Ordered()
    paths["/"] = {"get": {"summary": "Root", "operationId": "root__get", "responses": _responses({}, False)}}
    paths["/health-check"] = {
        "get": {
            "summary": "Healthcheck",
            "operationId": "healthcheck_health_check_get",
            "responses": _responses({}, False),
        }
    }
    paths["/predictions"] = {
        "post": {
            "summary": "Predict",
            "description": "Run a single prediction on the model",
            "operationId": "predict_predictions_post",
            "requestBody": {
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}
                }
            },
            "responses": _responses({"$ref": "#/components/schemas/PredictionResponse"}),
        }
    }
    cancel_param = {
        "required": True,
        "schema": {"title": "Prediction Id", "type": "string"},
        "name": "prediction_id",
        "in": "path",
    }
    paths["/predictions/{prediction_id}/cancel"] = {
        "post": {
            "summary": "Cancel",
            "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [cancel_param],
            "responses": _responses({}),
        }
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": COG_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def generate_from_source(
    text: str, class_name: str = "Predictor", filename: str = "predict.py"
) -> dict[str, Any]:
    """The OpenAPI document cog build writes for class_name in this predictor source."""
    source = _Source(text, filename)
    method = _predict_method(source, class_name)
    return _document(_fields(source, method), _output(source, method))


def generate(root: Path) -> dict[str, Any]:
    """The OpenAPI document for the predictor cog.yaml names (DEFAULT_PREDICTOR) under root."""
    filename, _, class_name = DEFAULT_PREDICTOR.partition(":")
    try:
        text = (root / filename).read_text(encoding="utf-8")
    except OSError as exc:
        raise SchemaError(f"cannot read {root / filename}: {exc.strerror}") from exc
    return generate_from_source(text, class_name, filename)


def dumps(value: Any, indent: int | None = None) -> str:
    """JSON as cog build's Go writes it: map keys sorted except cog's ordered maps, no `.0` on a whole
    float, HTML-safe escapes (the characters they replace occur only inside strings)."""
    text = json.dumps(
        _in_go_order(value), ensure_ascii=False, indent=indent, separators=(",", ": " if indent else ":")
    )
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def _in_go_order(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _in_go_order(value[key]) for key in (value if isinstance(value, _Ordered) else sorted(value))
        }
    if isinstance(value, list):
        return [_in_go_order(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float) and abs(value) < _MIN_FRACTION:
        raise ValueError(f"{value!r}: Go writes a float this small otherwise than Python does")
    return value


def input_snapshot(document: dict[str, Any]) -> str:
    """The public interface under review: the Input component plus the enum components its
    choices refer to, indented, so a change to any input shows as a diff."""
    schemas = document["components"]["schemas"]
    refs = [prop["allOf"][0]["$ref"] for prop in schemas["Input"]["properties"].values() if "allOf" in prop]
    interface = _Ordered(Input=schemas["Input"])
    for ref in refs:
        name = ref.rsplit("/", 1)[1]
        interface[name] = schemas[name]
    return dumps(interface, indent=2) + "\n"


def snapshot_diff(expected: str, actual: str) -> str:
    lines = difflib.unified_diff(
        expected.splitlines(keepends=True), actual.splitlines(keepends=True), str(SNAPSHOT), "generated"
    )
    return "".join(lines)


def _write(path: Path, text: str) -> None:
    """Write atomically, as cog build does, so a server never reads half a schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="openapi-schema",
        description="Write the OpenAPI schema `cog build` would write, from predict.py's source (no import).",
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="project directory (default: this repository)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output, relative to --root (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--snapshot", action="store_true", help=f"also rewrite {SNAPSHOT} under --root")
    args = parser.parse_args(argv)
    try:
        document = generate(args.root)
    except SchemaError as exc:
        print(f"openapi-schema: {exc}", file=sys.stderr)
        return 1
    out = args.root / args.out
    _write(out, dumps(document))
    print(f"wrote {out}")
    if args.snapshot:
        _write(args.root / SNAPSHOT, input_snapshot(document))
        print(f"wrote {args.root / SNAPSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
