"""Docs stay true: every `MuScleLoraConfig` field documented PEFT style; no docstring cites a missing file."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
from peft.config import PeftConfig

import peft_musclelora
from peft_musclelora import MuScleLoraConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(peft_musclelora.__file__).resolve().parent

OWN_FIELDS = [
    f for f in dataclasses.fields(MuScleLoraConfig) if f.name not in {g.name for g in dataclasses.fields(PeftConfig)}
]

#: One Args entry of a PEFT-style docstring: ``name (`type`, *optional*, defaults to `default`):`` then its text.
ENTRY = re.compile(
    r"^ {8}(?P<name>\w+) \(`(?P<type>[^`]+)`, \*optional\*, defaults to `(?P<default>[^`]*)`\):\n"
    r"(?P<text>(?: {12}.*\n?)+)",
    re.MULTILINE,
)


def _documented() -> dict[str, dict[str, str]]:
    return {m["name"]: m.groupdict() for m in ENTRY.finditer(MuScleLoraConfig.__doc__)}


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _render(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def test_config_declares_fields_beyond_peft_config() -> None:
    assert len(OWN_FIELDS) >= 15


@pytest.mark.parametrize("f", OWN_FIELDS, ids=lambda f: f.name)
def test_every_config_field_is_documented_with_type_and_default(f: dataclasses.Field) -> None:
    documented = _documented()

    assert f.name in documented, f"MuScleLoraConfig docstring has no ``{f.name} (`type`, *optional*, ...)`` entry"
    entry = documented[f.name]
    assert entry["default"] == _render(_default(f)), f"{f.name}: documented default differs from the field's"
    assert entry["text"].strip()
    assert f.metadata.get("help"), f"{f.name}: no metadata help"


@pytest.mark.parametrize("f", OWN_FIELDS, ids=lambda f: f.name)
def test_allowed_literal_values_appear_in_docstring_and_help(f: dataclasses.Field) -> None:
    hints = typing.get_type_hints(MuScleLoraConfig)
    literals = [arg for part in [hints[f.name], *typing.get_args(hints[f.name])] for arg in _literal_args(part)]
    entry = _documented()[f.name]

    for value in literals:
        assert f'"{value}"' in entry["text"] or f'"{value}"' in entry["type"], (f.name, value)
        assert f"'{value}'" in f.metadata["help"], (f.name, value)


def _literal_args(hint: object) -> tuple:
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


def test_documented_entries_are_fields() -> None:
    unknown = set(_documented()) - {f.name for f in OWN_FIELDS}

    assert not unknown, f"docstring documents fields MuScleLoraConfig does not have: {sorted(unknown)}"


#: A repository file named in library source: a path under a top-level folder, or a top-level upper-case Markdown.
FILE_REFERENCE = re.compile(r"(?<![\w/.-])((?:docs|benchmarks|examples|tests)/[\w./-]*\w|[A-Z][A-Z_]+\.md)\b")

#: Missing files still cited, with the pending fix (strict: once no library file cites one, the entry must go).
PENDING_REFERENCES: dict[str, str] = {}


def _cited_files() -> dict[str, list[str]]:
    cited: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for reference in FILE_REFERENCE.findall(line):
                cited.setdefault(reference, []).append(f"{path.relative_to(REPO)}:{number}")
    return cited


def test_library_cites_only_files_in_the_repository() -> None:
    cited = _cited_files()
    missing = {
        ref: where for ref, where in cited.items() if not (REPO / ref).exists() and ref not in PENDING_REFERENCES
    }

    assert not missing, f"library source cites files that are not in the repository: {missing}"


def test_pending_references_are_still_cited() -> None:
    cited = _cited_files()
    fixed = [ref for ref in PENDING_REFERENCES if ref not in cited or (REPO / ref).exists()]

    assert not fixed, f"PENDING_REFERENCES entries {fixed} are fixed: remove them"


def _readme_recipe_arguments() -> dict[str, object]:
    """The keyword arguments of `MuScleLoraTrainingArguments(...)` in the README's recommended-defense recipe."""
    import ast

    readme = (REPO / "README.md").read_text()
    section = readme.split("## The recommended defense in Python", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    calls = [
        node
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "MuScleLoraTrainingArguments"
    ]
    assert len(calls) == 1, "the recipe builds its training arguments once"
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in calls[0].keywords}


def test_the_readmes_python_recipe_is_the_recommended_preset() -> None:
    from peft_musclelora.benchmark.presets import PRESETS
    from peft_musclelora.row_filter import RowFilterArguments

    preset = PRESETS["recommended"].training
    defaults = RowFilterArguments()
    chosen = {
        f.name: getattr(preset.row_filter, f.name)
        for f in dataclasses.fields(RowFilterArguments)
        if getattr(preset.row_filter, f.name) != getattr(defaults, f.name)
    }
    recipe = _readme_recipe_arguments()
    assert {name: value for name, value in recipe.items() if name.startswith("row_filter")} == chosen
    assert recipe["learning_rate"] == preset.learning_rate
    assert recipe["num_train_epochs"] == preset.num_train_epochs
    assert recipe["per_device_train_batch_size"] == preset.per_device_train_batch_size
    assert recipe["reference_split_size"] == preset.ga.reference_split_size
