"""The reference in docs/ cannot drift from the code: the input tables are what scripts/docs writes
from the declared inputs, docs/configuration.md has one row for each variable the code reads, and
docs/layout.md names every module and script there is, and none that is gone. Links and references
by section name (docs/inputs.md, "Inpainting") lead to files and headings that exist.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import itertools
import re
from pathlib import Path
from typing import Any

import pytest

from cogserver import ROOT, script_module
from lcm import params
from lcm.params import Spec

input_docs = script_module("input_docs")
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


# Configuration: every LCM_* variable the code reads, collected from its source.
CONFIGURATION = ROOT / "docs" / "configuration.md"
ENV_NAME = re.compile(r"LCM_[A-Z0-9]+(?:_[A-Z0-9]+)*")
ENV_MENTION = re.compile(r"(?<![A-Za-z0-9_])LCM_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_])")
ENV_PREFIX = re.compile(r"(?<![A-Za-z0-9_])LCM_[A-Z0-9_]*$")  # a name whose end is computed
DOCUMENTED_ROW = re.compile(r"^\| `([A-Z][A-Z0-9_]*)` \|")


def _code_files() -> list[Path]:
    """The service's own code: lcm/, the Cog adapters and scripts/ (Python, by suffix or shebang).

    tests/ and bench/ are left out: they set variables for the service they run, and read none of
    their own that a deployment would set.
    """
    scripts = [
        path
        for path in sorted((ROOT / "scripts").iterdir())
        if path.is_file() and (path.suffix == ".py" or path.read_text().startswith("#!/usr/bin/env python"))
    ]
    return [*sorted((ROOT / "lcm").rglob("*.py")), ROOT / "predict.py", ROOT / "train.py", *scripts]


def variables_named(source: str, filename: str) -> set[str]:
    """Every string constant in `source` that is a whole LCM_* name.

    That is how the code names a variable it reads, whatever reads it: `NAME_ENV = "LCM_X"` (also in
    a tuple assignment), `os.environ.get("LCM_X")`, a helper's argument (`_flag("LCM_X", True)`).
    Only whole strings count, so a docstring or a message that mentions `LCM_X=1` adds nothing; a
    script that sets a variable for the engine names one the engine reads. A name that is computed
    (`"LCM_" + part`, `f"LCM_{part}"`) could not be checked, so it fails here, naming the file and
    line.
    """
    found = set()
    for node in ast.walk(ast.parse(source, filename)):
        parts = node.values if isinstance(node, ast.JoinedStr) else []
        for part, after in itertools.pairwise(parts):
            if isinstance(part, ast.Constant) and isinstance(after, ast.FormattedValue):
                if ENV_PREFIX.search(part.value):
                    raise AssertionError(
                        f"{filename}:{node.lineno}: spell the LCM_ variable's name out whole"
                    )
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if ENV_NAME.fullmatch(node.value):
                found.add(node.value)
            elif ENV_PREFIX.fullmatch(node.value):
                raise AssertionError(f"{filename}:{node.lineno}: spell the LCM_ variable's name out whole")
    return found


def _variables_read() -> set[str]:
    return set().union(
        *(variables_named(path.read_text(), str(path.relative_to(ROOT))) for path in _code_files())
    )


def _documented_rows() -> dict[str, list[list[str]]]:
    """Each variable given a table row in docs/configuration.md, with its rows' cells."""
    rows: dict[str, list[list[str]]] = {}
    for line in CONFIGURATION.read_text().split("\n"):
        if match := DOCUMENTED_ROW.match(line):
            rows.setdefault(match[1], []).append([cell.strip() for cell in line.strip()[1:-1].split(" | ")])
    return rows


@functools.cache
def _cog_package_bytes() -> bytes:
    """The installed cog and coglet packages' files (coglet's server is compiled), to find what Cog reads."""
    chunks = []
    for package in ("cog", "coglet"):
        for location in importlib.util.find_spec(package).submodule_search_locations:
            chunks += [path.read_bytes() for path in Path(location).rglob("*") if path.is_file()]
    return b"\n".join(chunks)


def test_the_collector_finds_every_way_the_code_names_a_variable_and_refuses_computed_names():
    source = "\n".join(
        [
            'A_ENV = "LCM_A"',
            'B_ENV, B_DEFAULT = "LCM_B", 3',
            'flag = _flag("LCM_C_D", True)',
            'text = os.environ.get("LCM_E2")',
            '"""LCM_DOC=1 in a docstring, LCM_Dreamshaper_v7 and LCM_ are no names."""',
            'message = f"{A_ENV}={text!r}: set LCM_F=1"',
        ]
    )
    assert variables_named(source, "x.py") == {"LCM_A", "LCM_B", "LCM_C_D", "LCM_E2"}
    for computed in ('name = "LCM_" + part', 'name = f"LCM_{part}"', 'log(f"set LCM_{part}_SIZE")'):
        with pytest.raises(AssertionError, match="x.py:1: spell the LCM_ variable's name out whole"):
            variables_named(computed, "x.py")


def test_every_variable_the_code_reads_has_one_row_in_configuration_md():
    read, rows = _variables_read(), _documented_rows()
    assert {"LCM_WEIGHTS_DIR", "LCM_DEVICE", "LCM_COMPILE", "LCM_KEEP_OUTPUTS_S"} <= read  # it collects
    missing = sorted(read - set(rows))
    assert not missing, f"docs/configuration.md has no row for {', '.join(missing)}: add one to its tables"
    twice = sorted(name for name, found in rows.items() if len(found) > 1)
    assert not twice, f"docs/configuration.md has more than one row for {', '.join(twice)}"


def test_configuration_md_documents_only_variables_that_are_read():
    """An LCM_ row must be read by this code; any other (COG_WEIGHTS, ...) by Cog's installed packages."""
    read = _variables_read()
    for name in _documented_rows():
        if name.startswith("LCM_"):
            assert name in read, f"docs/configuration.md documents {name}, which no code in lcm/ etc. reads"
        else:
            assert name.encode() in _cog_package_bytes(), (
                f"docs/configuration.md documents {name}: Cog reads no such variable"
            )


def test_the_code_mentions_only_variables_it_reads():
    """Messages, docstrings and comments that name a variable name one that exists (none renamed away)."""
    read = _variables_read()
    for path in _code_files():
        for number, line in enumerate(path.read_text().split("\n"), 1):
            unknown = sorted(set(ENV_MENTION.findall(line)) - read)
            assert not unknown, (
                f"{path.relative_to(ROOT)}:{number} names {', '.join(unknown)}, which nothing reads"
            )


def _flag_defaults() -> dict[str, bool]:
    """The on/off settings whose default is a literal: `_flag("LCM_X", True)` calls, wherever they are."""
    defaults = {}
    for path in _code_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "_flag"
                and len(node.args) == 2
                and all(isinstance(arg, ast.Constant) for arg in node.args)
            ):
                defaults[node.args[0].value] = node.args[1].value
    return defaults


def test_documented_defaults_agree_with_the_code():
    """Defaults that are module constants, or a literal passed to the flag reader, as the tables say them.

    What is checked: each constant's value appears in its row's default cells (a path relative to
    the repository), and each literal flag default reads `on` or `off` in both device columns (`–`
    where the setting does not apply). Defaults the code computes per device (`not cuda`) are read
    by a person only.
    """
    import predict
    from lcm import accel, compiling, openvino_runtime, weights

    rows = {name: found[0] for name, found in _documented_rows().items()}

    def relative(path: Path) -> str:
        return str(path.relative_to(ROOT))

    constants = {
        "LCM_KEEP_OUTPUTS_S": [f"{predict.KEEP_OUTPUTS_S:g}"],
        "LCM_WEIGHTS_DIR": [relative(weights.DEFAULT_WEIGHTS_DIR)],
        "LCM_COMPILE_CACHE": [relative(compiling.DEFAULT_COMPILE_CACHE)],
        "LCM_OPENVINO_CACHE": [
            f"<weights>/{openvino_runtime.CACHE_DIR}",
            relative(openvino_runtime.DEFAULT_CACHE),
        ],
        "LCM_COMPILE_SIZES": [f"{params.DEFAULT_SIZE}x{params.DEFAULT_SIZE}"],
        "LCM_BATCH_PIXELS": [str(accel.CUDA_BATCH_PIXELS)],
        "LCM_RUNTIME": [accel.CPU_RUNTIME],
    }
    for name, values in constants.items():
        defaults = " | ".join(rows[name][1:-1])  # every cell but the name and the meaning
        for value in values:  # as a whole word: `weights/` says weights, `weights2/` does not
            assert re.search(rf"(?<![\w.-]){re.escape(value)}(?![\w.-])", defaults), (
                f"docs/configuration.md: {name}'s default should say {value}, as the code has it: {defaults}"
            )
    flags = _flag_defaults()
    assert {"LCM_PLANNED_STEP", "LCM_COMPILE"} <= set(flags)  # the reader is still found
    for name, default in flags.items():
        cpu, cuda = rows[name][1:3]
        for device, cell in (("CPU", cpu), ("CUDA", cuda)):
            assert cell == "–" or cell.split(" ")[0] == ("on" if default else "off"), (
                f"docs/configuration.md: {name}'s {device} default should be {'on' if default else 'off'}"
            )


# Layout: what docs/layout.md names, as paths of files (name.py, dir/name.py) and folders (dir/).
LAYOUT = ROOT / "docs" / "layout.md"
FILE_NAMED = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)(?![\w/-])")
FOLDER_NAMED = re.compile(r"(?<![\w/.<>-])((?:[\w-]+/)*[\w-]+)/(?![\w.-])")


def _lcm_modules() -> list[Path]:
    return sorted(path for path in (ROOT / "lcm").rglob("*.py") if path.name != "__init__.py")


def test_layout_names_every_module_of_lcm_and_the_adapters():
    """By its path from lcm/ or from the root, or by its file name alone (as a tree lists it)."""
    named = set(FILE_NAMED.findall(LAYOUT.read_text()))
    unnamed = [
        str(path.relative_to(ROOT))
        for path in _lcm_modules()
        if not {str(path.relative_to(ROOT / "lcm")), str(path.relative_to(ROOT)), path.name} & named
    ]
    assert not unnamed, f"docs/layout.md does not name {', '.join(unnamed)}: say what each is for"
    assert {"predict.py", "train.py"} <= named


def test_layout_names_every_script_and_the_top_level_folders():
    text = LAYOUT.read_text()
    scripts = [path.name for path in sorted((ROOT / "scripts").iterdir()) if path.is_file()]
    unnamed = [name for name in scripts if not re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w/-])", text)]
    assert not unnamed, f"docs/layout.md does not name scripts/{', scripts/'.join(unnamed)}"
    assert {"lcm", "scripts", "tests", "bench", "docs"} <= set(FOLDER_NAMED.findall(text))


def test_layout_names_nothing_that_is_gone():
    """Each file or folder it names is in the root, lcm/ (a bare name anywhere in it) or scripts/."""
    text = LAYOUT.read_text()
    modules = {path.name for path in _lcm_modules()}
    gone = [
        name
        for name in FILE_NAMED.findall(text)
        if not any((base / name).is_file() for base in (ROOT, ROOT / "lcm", ROOT / "scripts"))
        and name not in modules
    ]
    gone += [
        f"{name}/"
        for name in FOLDER_NAMED.findall(text)
        if not any((base / name).is_dir() for base in (ROOT, ROOT / "lcm"))
    ]
    assert not gone, f"docs/layout.md names {', '.join(gone)}, which are not there any more"


# Links: markdown links, and the code's references to a file's section by its name.
MARKDOWN_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A file whose sections are headings, then one of them in quotes: the README's, docs/'s, bench's.
SECTION_REFERENCE = re.compile(
    r"(?<![\w/.-])`?(docs/[\w-]+\.md|bench/README\.md|README(?:\.md)?)`?(?:'s)?,?\s+\"([^\"]+)\""
)
DOCS_MENTION = re.compile(r"(?<![\w/.-])docs/[\w-]+\.md")


def _headings(path: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in path.read_text().split("\n") if line.startswith("#")]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _project_text() -> dict[Path, str]:
    """Every text file that may point a reader somewhere, comment continuations (# ...) joined."""
    paths = [ROOT / name for name in ("README.md", "Makefile", "cog.yaml", "predict.py", "train.py")]
    for folder in ("lcm", "scripts", "tests", "bench", "docs"):
        paths += [
            path
            for path in sorted((ROOT / folder).rglob("*"))
            if path.is_file() and (path.suffix in (".py", ".md", ".yaml") or path.parent.name == "scripts")
        ]
    return {path: re.sub(r"\n\s*#\s*", " ", path.read_text()) for path in paths}


@pytest.mark.parametrize("markdown", MARKDOWN_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_markdown_links_lead_to_files_and_headings_that_exist(markdown):
    for target in MARKDOWN_LINK.findall(markdown.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (markdown.parent / file).resolve() if file else markdown
        assert linked.exists(), f"{markdown.relative_to(ROOT)} links to {target}: no such file"
        if anchor:
            anchors = [_anchor(heading) for heading in _headings(linked)]
            assert anchor in anchors, f"{markdown.relative_to(ROOT)} links to {target}: no such heading"


def test_references_by_section_name_name_a_heading_of_that_file():
    for path, text in _project_text().items():
        for file, title in SECTION_REFERENCE.findall(text):
            title = " ".join(title.split())
            headings = _headings(ROOT / (file if file.endswith(".md") else "README.md"))
            assert any(heading == title or heading.startswith(f"{title} (") for heading in headings), (
                f'{path.relative_to(ROOT)} refers to {file}, "{title}": it has no such heading'
            )


def test_every_docs_file_mentioned_exists():
    for path, text in _project_text().items():
        for mention in DOCS_MENTION.findall(text):
            assert (ROOT / mention).is_file(), f"{path.relative_to(ROOT)} mentions {mention}: no such file"
