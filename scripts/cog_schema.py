"""Generate the OpenAPI schema that `cog build` (Cog 0.23.1) writes to .cog/openapi_schema.json.

Cog's server (coglet) validates requests and serves /openapi.json only from that file, and
`cog build` needs Docker, which our machines lack. This module reproduces the build's static
generator (replicate/cog pkg/schema: a tree-sitter reading of predict.py, no import) with
Python's ast, byte for byte where it can, so the schema can be generated, served and tested
anywhere.

Where cog build would silently lose meaning (a bound or description it cannot read, a default
it turns into None, a string it copies undecoded) this generator fails instead, naming the
parameter and the fix: a predict.py that passes here gets the schema its source says. It also
refuses what Cog's Python runtime would reject at setup (choices with bounds, a default outside
its bounds or choices), so those mistakes surface before a build.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import difflib
import io
import json
import math
import os
import re
import sys
import tempfile
import tokenize
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

COG_VERSION = "0.23.1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PREDICTOR = "predict.py:Predictor"
DEFAULT_OUT = Path(".cog/openapi_schema.json")
SNAPSHOT = Path("tests/snapshots/openapi_input.json")
REFRESH_HINT = f"scripts/openapi-schema --snapshot (then review and commit {SNAPSHOT})"

# JSON schema of each primitive annotation cog knows, by name (pkg/schema/types.go JSONType).
_PRIMITIVES: dict[str, dict[str, Any]] = {
    "bool": {"type": "boolean"},
    "float": {"type": "number"},
    "int": {"type": "integer"},
    "str": {"type": "string"},
    "Path": {"type": "string", "format": "uri"},
    "File": {"type": "string", "format": "uri"},
    "Secret": {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
    "Any": {"type": "object"},
}
# Python types a default of each primitive may have (Cog's runtime normalisation); Any takes any.
_VALUE_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,),
    "float": (int, float),
    "int": (int,),
    "str": (str,),
    "Path": (str,),
    "File": (str,),
    "Secret": (str,),
}
_INT_TEXT = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|[0-9]+)")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT64 = range(-(2**63), 2**63)
_SUPPORTED_INPUT_ARGS = ("default", "description", "ge", "le", "choices")


class SchemaError(Exception):
    """predict.py is something cog build rejects, or would describe differently from its source."""


class _Ordered(dict):
    """A JSON object written in insertion order (cog's orderedMapAny); plain dicts are written
    with sorted keys, as Go writes its maps."""


@dataclass(frozen=True)
class _Ann:
    """A type annotation as cog reads it: a dotted name, its subscript arguments, or a union."""

    name: str
    args: tuple[_Ann, ...] = ()
    union: bool = False
    generic: bool = False


@dataclass(frozen=True)
class _InputType:
    """An input's type: a primitive, maybe in a list, maybe nullable (Optional)."""

    primitive: str
    array: bool = False
    nullable: bool = False

    def json(self) -> dict[str, Any]:
        schema = dict(_PRIMITIVES[self.primitive])
        if self.array:
            schema = {"type": "array", "items": schema}
        if self.nullable:
            schema["nullable"] = True
        return schema


_NO_DEFAULT = object()


@dataclass
class _Field:
    """One predict() parameter with the Input() settings cog build reads."""

    name: str
    type: _InputType
    default: Any = _NO_DEFAULT
    description: str | None = None
    ge: float | None = None
    le: float | None = None
    choices: list[Any] | None = None


class _Module:
    """predict.py parsed once: its tokens (parentheses the ast drops), imports and constants."""

    def __init__(self, text: str, filename: str) -> None:
        self.text = text.replace("\r\n", "\n").replace("\r", "\n")
        self.filename = filename
        self.lines = self.text.split("\n")
        try:
            self.tree = ast.parse(self.text, filename)
        except SyntaxError as exc:
            raise SchemaError(f"{filename}:{exc.lineno}: cannot parse: {exc.msg}") from exc
        kinds = (tokenize.OP, tokenize.NAME, tokenize.NUMBER, tokenize.STRING)
        tokens = tokenize.generate_tokens(io.StringIO(self.text).readline)
        self.tokens = [(tok.start, tok.string) for tok in tokens if tok.type in kinds]
        self.token_starts = [start for start, _ in self.tokens]
        self.imports: dict[str, tuple[str, str]] = {}
        self.assignments: dict[str, list[ast.AST]] = {}
        for stmt in self.tree.body:
            self._collect(stmt)

    def _collect(self, stmt: ast.stmt) -> None:
        """Record module-level imports and assignments, the only ones cog build looks at."""
        if isinstance(stmt, ast.ImportFrom):
            module = "." * stmt.level + (stmt.module or "")
            for alias in stmt.names:
                self.imports[alias.asname or alias.name] = (module, alias.name)
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                self.imports[alias.asname or alias.name] = (alias.name, alias.name)
        elif isinstance(stmt, ast.Assign):
            simple = len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            for target in stmt.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        self.assignments.setdefault(name.id, []).append(stmt.value if simple else stmt)
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and isinstance(stmt.target, ast.Name):
            value = stmt.value if isinstance(stmt, ast.AnnAssign) else stmt
            if value is not None:
                self.assignments.setdefault(stmt.target.id, []).append(value)

    def error(self, node: ast.AST, message: str) -> SchemaError:
        return SchemaError(f"{self.filename}:{getattr(node, 'lineno', '?')}: {message}")

    def source(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ""

    def _position(self, node: ast.AST) -> tuple[int, int]:
        """(line, character column) of node; the ast counts columns in UTF-8 bytes."""
        line = self.lines[node.lineno - 1]
        return node.lineno, len(line.encode()[: node.col_offset].decode())

    def parenthesized(self, node: ast.AST, opener: ast.AST | None = None) -> bool:
        """Whether node sits inside its own parentheses: tree-sitter keeps those as a node cog
        build cannot read, while the ast drops them. opener is a tuple whose '(' precedes node."""
        index = bisect.bisect_left(self.token_starts, self._position(node)) - 1
        if index < 0 or self.tokens[index][1] != "(":
            return False
        return opener is None or self.tokens[index][0] != self._position(opener)

    def literal(
        self, node: ast.AST, what: str, allow_name: bool = False, opener: ast.AST | None = None
    ) -> Any:
        """A default, choice or constant as cog build reads it (pkg/schema/python/literals.go),
        or SchemaError where cog would read nothing or something other than Python does."""
        text = self.source(node)
        if self.parenthesized(node, opener):
            raise self.error(
                node,
                f"{what}: cog build cannot read `({text})`: it would drop a value in parentheses; "
                "remove them (for a long string, one plain literal or a module-level constant)",
            )
        if isinstance(node, ast.Constant):
            return self._constant_literal(node, what, text)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            if _INT_TEXT.fullmatch(text):
                return self._checked_int(node, what, int(text, 0))
            if _FLOAT_TEXT.fullmatch(text):
                return self._checked_float(node, what, float(text))
        elif isinstance(node, ast.List):
            return [self.literal(item, what) for item in node.elts]
        elif isinstance(node, ast.Tuple):
            return [self.literal(item, what, opener=node) for item in node.elts]
        elif isinstance(node, ast.Name) and allow_name:
            return self.constant(node, what)
        hint = ""
        if isinstance(node, ast.Call) and self.source(node.func).endswith("Input"):
            hint = " (cog build only recognises a bare `Input(...)` call: use `from cog import Input`)"
        raise self.error(
            node,
            f"{what}: cog build cannot statically resolve `{text}`{hint}; use a literal "
            "(str, int, float, bool, None or a list of them) or a module-level constant",
        )

    def _constant_literal(self, node: ast.Constant, what: str, text: str) -> Any:
        value = node.value
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return self._checked_int(node, what, value)
        if isinstance(value, float):
            return self._checked_float(node, what, value)
        if isinstance(value, str):
            as_cog_reads_it = _cog_string(text)
            if as_cog_reads_it is None:
                raise self.error(
                    node, f"{what}: cog build cannot read the string literal `{text}`; use plain quotes"
                )
            if as_cog_reads_it != value:
                raise self.error(
                    node,
                    f"{what}: cog build reads the string literal `{text}` verbatim as {as_cog_reads_it!r}, "
                    f"not {value!r}: it decodes no escapes, prefixes or implicit concatenation; "
                    "write one plain string literal",
                )
            return value
        raise self.error(node, f"{what}: cog build cannot read the literal `{text}`")

    def _checked_int(self, node: ast.AST, what: str, value: int) -> int:
        if "_" in self.source(node) or value not in _INT64:
            raise self.error(node, f"{what}: write `{self.source(node)}` without underscores, within 64 bits")
        return value

    def _checked_float(self, node: ast.AST, what: str, value: float) -> float:
        if "_" in self.source(node) or not math.isfinite(value):
            raise self.error(
                node, f"{what}: write `{self.source(node)}` as a finite number without underscores"
            )
        return value

    def constant(self, node: ast.Name, what: str) -> Any:
        """A module-level constant, which cog build resolves only when assigned a literal."""
        values = self.assignments.get(node.id, [])
        if len(values) != 1:
            count = "not assigned at" if not values else f"assigned {len(values)} times at"
            raise self.error(
                node,
                f"{what}: `{node.id}` is {count} the top level of {self.filename}; cog build resolves "
                "only names assigned a literal exactly once there",
            )
        return self.literal(values[0], f"{what} (module constant {node.id})")

    def number(self, node: ast.AST, what: str) -> float:
        """A ge/le bound: cog build reads only a number literal and silently drops anything else."""
        text = self.source(node)
        if self.parenthesized(node) or not _FLOAT_TEXT.fullmatch(text):
            raise self.error(
                node,
                f"{what}: write a plain number literal (no names, parentheses or underscores), not `{text}`: "
                "cog build reads bounds only as literals and would silently drop this one, so the server "
                "would not enforce it",
            )
        return float(text)

    def choices(self, node: ast.AST, what: str) -> list[Any]:
        """choices=: a list literal, a module-level list constant, or a + of those."""
        if self.parenthesized(node):
            raise self.error(
                node, f"{what}: cog build cannot read `({self.source(node)})`; remove the parentheses"
            )
        if isinstance(node, ast.List):
            return self.literal(node, what)
        if isinstance(node, ast.Name):
            value = self.constant(node, what)
            if isinstance(value, list):
                return value
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.choices(node.left, what) + self.choices(node.right, what)
        raise self.error(
            node,
            f"{what}: cog build cannot statically resolve `{self.source(node)}`; use a list literal "
            "or a module-level list constant",
        )

    def annotation(self, node: ast.AST) -> _Ann:
        """The annotation as cog's tree-sitter reader sees it (pkg/schema/python/annotations.go)."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                return self.annotation(ast.parse(node.value.strip(), mode="eval").body)
            except SyntaxError as exc:
                raise self.error(node, f"unsupported type: string annotation {node.value!r}") from exc
        if isinstance(node, ast.Constant) and node.value is None:
            return _Ann("None")
        if isinstance(node, (ast.Name, ast.Attribute)):
            return _Ann(ast.unparse(node))
        if isinstance(node, ast.Subscript):
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            return _Ann(ast.unparse(node.value), tuple(self.annotation(item) for item in items), generic=True)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            members: list[_Ann] = []
            for side in (self.annotation(node.left), self.annotation(node.right)):
                members.extend(side.args if side.union else [side])
            return _Ann("|", tuple(members), union=True)
        raise self.error(node, f"unsupported type: {ast.unparse(node)}")


def _cog_string(text: str) -> str | None:
    """How cog build reads a string literal's source text (parseStringLiteral): the characters
    between the quotes, undecoded; None for prefixes it does not know."""
    if text.startswith(('"""', "'''")):
        return text[3:-3] if len(text) >= 6 else None
    if text.startswith(('"', "'")):
        return text[1:-1]
    if text.startswith(('r"', "r'")):
        return text[2:-1]
    return None


def _unqualified(name: str) -> str:
    """`module.Type` -> `Type`, as cog's ResolveQualifiedName does for any prefix."""
    return name.split(".", 1)[1] if "." in name else name


class _Generator:
    """The predictor's inputs and output, read from its source as cog build reads them."""

    def __init__(self, module: _Module, class_name: str) -> None:
        self.module = module
        self.method = self._find_method(class_name)

    def _find_method(self, class_name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
        module = self.module
        classes = [
            node for node in module.tree.body if isinstance(node, ast.ClassDef) and node.name == class_name
        ]
        if len(classes) != 1:
            found = "not found" if not classes else "defined more than once"
            raise SchemaError(f"{module.filename}: predictor class {class_name} {found} at its top level")
        methods = {
            node.name: node
            for node in classes[0].body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in ("run", "predict")
        }
        if len(methods) != 1:
            found = "both run() and predict()" if methods else "neither run() nor predict()"
            raise module.error(classes[0], f"{class_name} defines {found} in its body; define exactly one")
        method = next(iter(methods.values()))
        if method.decorator_list:
            raise module.error(method, f"decorators on {method.name}() are not supported by this generator")
        return method

    def fields(self) -> list[_Field]:
        module, method = self.module, self.method
        args = method.args
        if args.posonlyargs or args.vararg or args.kwonlyargs or args.kwarg:
            raise module.error(
                method, f"{method.name}() must take plain parameters: no /, *, *args or **kwargs"
            )
        if not args.args or args.args[0].arg != "self" or args.args[0].annotation is not None:
            raise module.error(method, f"{method.name}() must take an unannotated `self` first")
        params = args.args[1:]
        defaults: list[ast.expr | None] = [None] * (len(params) - len(args.defaults)) + list(args.defaults)
        return [self._field(param, default) for param, default in zip(params, defaults, strict=True)]

    def _field(self, param: ast.arg, default: ast.expr | None) -> _Field:
        module, name = self.module, param.arg
        if param.annotation is None:
            raise module.error(param, f"parameter '{name}' on {self.method.name}() has no type annotation")
        field = _Field(name, self._input_type(param.annotation, name))
        what = f"parameter '{name}'"
        if default is None:
            return field
        if isinstance(default, ast.Call) and self._is_input_call(default):
            self._read_input_call(default, field)
        else:
            field.default = module.literal(default, f"{what}: default", allow_name=True)
        _check_runtime_rules(module, param, field)
        return field

    def _is_input_call(self, call: ast.Call) -> bool:
        """cog build's test: the callee's text is `Input` or an alias imported from cog."""
        text = self.module.source(call.func)
        return text == "Input" or self.module.imports.get(text) == ("cog", "Input")

    def _read_input_call(self, call: ast.Call, field: _Field) -> None:
        module, what = self.module, f"parameter '{field.name}'"
        if call.args:
            raise module.error(
                call, f"{what}: pass Input() keyword arguments only; cog build ignores positional ones"
            )
        for keyword in call.keywords:
            key, value = keyword.arg, keyword.value
            if key == "default":
                field.default = module.literal(value, f"{what}: default", allow_name=True)
            elif key == "description":
                description = module.literal(value, f"{what}: description", allow_name=True)
                if not isinstance(description, str):
                    raise module.error(value, f"{what}: description must be a string")
                field.description = description
            elif key in ("ge", "le"):
                setattr(field, key, module.number(value, f"{what}: {key}"))
            elif key == "choices":
                field.choices = module.choices(value, f"{what}: choices")
            elif key == "default_factory":
                raise module.error(keyword, f"{what}: default_factory is not supported by cog build")
            else:
                raise module.error(
                    keyword,
                    f"{what}: Input({key or '**'}=...) is not supported by scripts/cog_schema.py, "
                    f"which reads {', '.join(_SUPPORTED_INPUT_ARGS)}",
                )

    def _input_type(self, node: ast.AST, name: str) -> _InputType:
        return self._resolve_input(self.module.annotation(node), node, name)

    def _resolve_input(self, ann: _Ann, node: ast.AST, name: str) -> _InputType:
        """pkg/schema/schema_type.go resolveInputType, for primitives, Optional and lists."""
        fail = f"parameter '{name}': unsupported type"
        if ann.union or _unqualified(ann.name) == "Union":
            members = [member for member in ann.args if member.name != "None"]
            if len(members) != 1 or len(members) == len(ann.args):
                raise self.module.error(
                    node, f"{fail}: only `X | None` unions are supported by this generator"
                )
            return replace(self._resolve_input(members[0], node, name), nullable=True)
        outer = _unqualified(ann.name)
        if not ann.generic:
            if outer in ("dict", "Dict"):
                return _InputType("Any")
            if outer in _PRIMITIVES:
                return _InputType(outer)
            origin = self.module.imports.get(ann.name.split(".", 1)[0])
            if origin:
                raise self.module.error(
                    node, f"parameter '{name}': cannot resolve type '{outer}' (imported from '{origin[0]}')"
                )
            raise self.module.error(node, f"{fail}: {ann.name}")
        if outer == "Optional" and len(ann.args) == 1:
            return replace(self._resolve_input(ann.args[0], node, name), nullable=True)
        if outer in ("List", "list") and len(ann.args) == 1:
            inner = self._resolve_input(ann.args[0], node, name)
            if inner.nullable or inner.array:
                raise self.module.error(
                    node, f"{fail}: nested generics like List[Optional[X]] are not supported"
                )
            return replace(inner, array=True)
        raise self.module.error(node, f"{fail}: {ast.unparse(node)} is not a supported input type")

    def output(self) -> dict[str, Any]:
        """The Output component (pkg/schema/schema_type.go JSONSchema) for primitives and lists."""
        returns = self.method.returns
        if returns is None:
            raise self.module.error(self.method, f"missing return type annotation on {self.method.name}()")
        schema = self._output_schema(self.module.annotation(returns), returns)
        schema["title"] = "Output"
        return schema

    def _output_schema(self, ann: _Ann, node: ast.AST) -> dict[str, Any]:
        outer = _unqualified(ann.name)
        if ann.union or outer in ("Optional", "Union"):
            raise self.module.error(
                node, "unsupported output type: Optional and unions are not allowed as a return type"
            )
        if not ann.generic and outer in ("dict", "Dict"):
            return {"type": "object"}
        if not ann.generic and outer in _PRIMITIVES:
            return dict(_PRIMITIVES[outer])
        if ann.generic and outer in ("List", "list") and len(ann.args) == 1:
            return {"type": "array", "items": self._output_schema(ann.args[0], node)}
        raise self.module.error(
            node,
            f"return type {ast.unparse(node)} is not supported by this generator "
            "(it handles str, int, float, bool, Path, Any and lists of them)",
        )


def _check_runtime_rules(module: _Module, node: ast.AST, field: _Field) -> None:
    """Refuse what Cog's Python runtime refuses at setup or on every default-valued request
    (cog/_inspector.py _validate_input_constraints and check_input)."""
    what, kind = f"parameter '{field.name}'", field.type.primitive
    numeric = kind in ("int", "float") and not field.type.array
    if (field.ge is not None or field.le is not None) and not numeric:
        raise module.error(node, f"{what}: ge/le apply only to int and float inputs")
    if field.choices is not None:
        if kind not in ("int", "str") or field.type.array:
            raise module.error(node, f"{what}: choices apply only to int and str inputs")
        if len(field.choices) < 2:
            raise module.error(node, f"{what}: choices need at least 2 values")
        if field.ge is not None or field.le is not None:
            raise module.error(node, f"{what}: choices and ge/le are mutually exclusive")
        if not all(type(choice) is _VALUE_TYPES[kind][0] for choice in field.choices):
            raise module.error(node, f"{what}: every choice must be a {kind}")
    if field.default is _NO_DEFAULT or field.default is None:
        return
    values = field.default if field.type.array and isinstance(field.default, list) else [field.default]
    value_types = _VALUE_TYPES.get(kind, (object,))
    if not all(
        isinstance(value, value_types) and (kind == "bool" or not isinstance(value, bool)) for value in values
    ):
        raise module.error(
            node, f"{what}: default {field.default!r} is not a valid {ast.unparse(node.annotation)}"
        )
    for value in values:
        if field.ge is not None and value < field.ge or field.le is not None and value > field.le:
            raise module.error(
                node, f"{what}: default {value!r} is outside [ge, le] = [{field.ge}, {field.le}]"
            )
        if field.choices is not None and value not in field.choices:
            raise module.error(node, f"{what}: default {value!r} is not one of the choices {field.choices!r}")


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
            enum_type = _PRIMITIVES[field.type.primitive]["type"]
            enum = {
                "title": field.name,
                "description": "An enumeration.",
                "enum": field.choices,
                "type": enum_type,
            }
            enums.append((field.name, enum))
            prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
        else:
            prop["title"] = _title(field.name)
            prop.update(field.type.json())
        nullable = field.type.nullable
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


def generate_from_source(text: str, class_name: str, filename: str = "predict.py") -> dict[str, Any]:
    """The OpenAPI document cog build writes for class_name in this predictor source."""
    generator = _Generator(_Module(text, filename), class_name)
    return _document(generator.fields(), generator.output())


def generate(root: Path, predictor: str = DEFAULT_PREDICTOR) -> dict[str, Any]:
    """The OpenAPI document for a cog.yaml-style predictor reference ("file.py:Class") under root."""
    path, sep, class_name = predictor.partition(":")
    if not sep or not path.endswith(".py") or not class_name:
        raise SchemaError(f"invalid predictor reference {predictor!r}: expected file.py:ClassName")
    relative = Path(os.path.normpath(path))
    if relative.is_absolute() or relative.parts[:1] == ("..",):
        raise SchemaError(f"predictor source path {path!r} is outside {root}")
    try:
        text = (root / relative).read_text(encoding="utf-8")
    except OSError as exc:
        raise SchemaError(f"failed to read predictor source {root / relative}: {exc.strerror}") from exc
    return generate_from_source(text, class_name, str(relative))


def _go_float(value: float) -> str:
    """A float as Go's encoding/json writes it: shortest digits, exponent only outside [1e-6, 1e21)."""
    if value == 0 or 1e-6 <= abs(value) < 1e21:
        return format(Decimal(repr(value)), "f").removesuffix(".0")
    mantissa, exponent = repr(value).split("e")
    return f"{mantissa}e{exponent[0]}{exponent[1:].lstrip('0') or '0'}"


def _go_string(text: str) -> str:
    """A string as Go's encoding/json writes it, HTML-safe escapes included."""
    escaped = json.dumps(text, ensure_ascii=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        escaped = escaped.replace(char, escape)
    return escaped


def dumps(value: Any, indent: int | None = None, _level: int = 0) -> str:
    """JSON as cog build's Go writes it: compact, map keys sorted except cog's ordered maps."""
    if isinstance(value, dict):
        keys = list(value) if isinstance(value, _Ordered) else sorted(value)
        separator = ": " if indent is not None else ":"
        items = [f"{_go_string(key)}{separator}{dumps(value[key], indent, _level + 1)}" for key in keys]
        return _wrap("{", items, "}", indent, _level)
    if isinstance(value, list):
        return _wrap("[", [dumps(item, indent, _level + 1) for item in value], "]", indent, _level)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    return _go_string(value)


def _wrap(opening: str, items: list[str], closing: str, indent: int | None, level: int) -> str:
    if not items:
        return opening + closing
    if indent is None:
        return opening + ",".join(items) + closing
    inner = "\n" + " " * (indent * (level + 1))
    return opening + inner + ("," + inner).join(items) + "\n" + " " * (indent * level) + closing


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
        "--predictor",
        default=DEFAULT_PREDICTOR,
        help=f"file.py:Class under --root (default: {DEFAULT_PREDICTOR})",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output, relative to --root (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--snapshot", action="store_true", help=f"also rewrite {SNAPSHOT} under --root")
    args = parser.parse_args(argv)
    try:
        document = generate(args.root, args.predictor)
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
