"""The reference in docs/ cannot drift from the code: the input tables are what scripts/docs writes
from the declared inputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cogserver import ROOT
from lcm import params
from lcm.params import Spec


def _script_module(name: str) -> ModuleType:
    """scripts/<name>.py, a module beside its CLI rather than a package."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


input_docs = _script_module("input_docs")
INPUTS_TABLE = input_docs.TABLES[0]


def _text(table: Any) -> str:
    return (ROOT / table.path).read_text()


@pytest.mark.parametrize("table", input_docs.TABLES, ids=lambda table: str(table.path))
def test_committed_input_tables_are_what_the_declared_inputs_make(table):
    text = _text(table)
    generated = input_docs.rewrite(text, table)
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(True), generated.splitlines(True), str(table.path), "generated", n=0
        )
    )
    assert generated == text, (
        f"{table.path} is not what {table.source} makes: run {input_docs.REFRESH_HINT}\n{diff}"
    )


def test_a_changed_default_or_bound_rewrites_only_its_row_and_keeps_its_meaning():
    text = _text(INPUTS_TABLE)
    specs = tuple(
        dataclasses.replace(spec, default=6, high=40) if spec.name == "num_inference_steps" else spec
        for spec in params.INPUTS
    )
    changed = [
        (old, new)
        for old, new in zip(
            text.split("\n"), input_docs.rewrite(text, INPUTS_TABLE, specs).split("\n"), strict=True
        )
        if old != new
    ]
    assert len(changed) == 1
    old, new = changed[0]
    meaning = input_docs.meanings(text, INPUTS_TABLE)["num_inference_steps"]
    assert old.startswith("| `num_inference_steps` | int | `4` | 1 to 50 | ")
    assert new == f"| `num_inference_steps` | int | `6` | 1 to 40 | {meaning} |"


def test_rows_follow_the_declared_inputs_dropping_the_gone_and_adding_the_new():
    text = _text(INPUTS_TABLE)
    new_input = Spec("new_input", 3, int, 1, 9, help="a new input's help")
    specs = (*reversed(params.INPUTS[1:]), new_input)
    rows = input_docs.meanings(input_docs.rewrite(text, INPUTS_TABLE, specs), INPUTS_TABLE)
    assert list(rows) == [spec.name for spec in specs]  # in the declared order, without the prompt
    assert rows["new_input"] == "a new input's help"  # a first meaning, to be written over
    assert rows["seed"] == input_docs.meanings(text, INPUTS_TABLE)["seed"]


@pytest.mark.parametrize(
    "spec, cells",
    [
        (
            Spec("w", None, int, 256, 1024, optional=True, multiple=8),
            ("int", "none", "256 to 1024, a multiple of 8"),
        ),
        (Spec("archive", None, Path), ("file", "required", "")),
        (Spec("rate", 1e-4, float, 1e-6, 1e-2), ("float", "`0.0001`", "1e-06 to 0.01")),
        (Spec("seed", None, int, 0, 2**32 - 1, optional=True), ("int", "none", "0 to 4294967295")),
        (Spec("format", "png", str, choices=("png", "jpg")), ("string", '`"png"`', "png, jpg")),
        (Spec("text", "", str, high=10), ("string", '`""`', "at most 10 characters")),
        (Spec("flag", False, bool), ("bool", "`false`", "")),
    ],
)
def test_cells_say_what_validation_allows_and_the_default_as_json(spec, cells):
    assert (input_docs.type_cell(spec), input_docs.default_cell(spec), input_docs.range_cell(spec)) == cells


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text.replace(input_docs.END, ""), "needs one table between"),
        (lambda text: text.replace("| `seed` | int |", "| `seed` |", 1), "docs/inputs.md:"),
        (lambda text: text.replace("| `seed` |", "| `clip_skip` |", 1), "clip_skip has a row already"),
    ],
    ids=["no end marker", "a row short of a cell", "an input twice"],
)
def test_a_file_the_generator_cannot_rewrite_safely_fails_naming_where(edit, message):
    with pytest.raises(input_docs.DocsError, match=message):
        input_docs.rewrite(edit(_text(INPUTS_TABLE)), INPUTS_TABLE)
