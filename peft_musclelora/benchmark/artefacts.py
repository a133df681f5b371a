"""What a cell leaves on disk: file names, JSON writing, staging, cell info, versions and resource use.

A finished cell is a directory holding `metrics.json` (its presence marks the cell finished), `adapter/` (with
`cell.json` or `instruct.json`, what reloading needs), `log_history.json` and, with row filtering,
`row_filter.json`. Cells are written into a temporary directory and published only on success ([`staged_cell`]).
Nothing here imports torch.

Example:
    >>> ADAPTER_DIRNAME, METRICS_FILE
    ('adapter', 'metrics.json')
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

from ..row_filter import trained_rows
from .data import LoadedData

ADAPTER_DIRNAME = "adapter"
CELL_FILE = "cell.json"
INSTRUCT_FILE = "instruct.json"
INIT_WEIGHTS_FILE = "initialized_weights.safetensors"
METRICS_FILE = "metrics.json"
LOG_HISTORY_FILE = "log_history.json"
ROW_FILTER_FILE = "row_filter.json"


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON through a temporary file (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def cell_dir(output_dir: Path, attack: str, method: str, seed: int, trusted: Optional[int] = None) -> Path:
    """Directory of one bench cell (of one trusted-row count, for the curve).

    Example:
        >>> cell_dir(Path("out"), "badnets", "lora", 0).as_posix()
        'out/cells/badnets/lora/seed0'
        >>> cell_dir(Path("out"), "addsent", "clean-only", 1, trusted=96).as_posix()
        'out/cells/addsent/clean-only/trusted96/seed1'
    """
    method_dir = output_dir / "cells" / attack / method
    return (method_dir if trusted is None else method_dir / f"trusted{trusted}") / f"seed{seed}"


def finished_cell(path: Path) -> Optional[dict[str, Any]]:
    """The metrics of a finished (`status: ok`) cell at `path`, else None (missing, failed or unreadable)."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) and previous.get("status") == "ok" else None


def prepare_output_dir(path: Union[str, os.PathLike], option: str = "--output-dir") -> Path:
    """Create `path` (with parents) and check it is a writable directory; a one-line `ValueError` naming it if not.

    Called before any training, so that a file in the way or a read-only directory is found in a second, not after
    the run.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a directory.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot write there ({error.strerror or error}).") from None
    return path


#: Everything a finished cell holds; a new run of the cell replaces all of them (and removes the ones it lacks).
CELL_ARTEFACTS = (ADAPTER_DIRNAME, METRICS_FILE, LOG_HISTORY_FILE, ROW_FILTER_FILE, "checkpoints")


@contextlib.contextmanager
def staged_cell(output_dir: Path) -> Iterator[Path]:
    """A temporary directory inside `output_dir` where a cell is written; published only if the block succeeds.

    On success the old cell's artefacts ([`CELL_ARTEFACTS`]) are replaced by the new ones, `metrics.json` last (its
    presence marks a finished cell, so a cell is never "finished" with half of another run's files). On any error,
    Ctrl-C included, the temporary directory is removed and the old cell is left exactly as it was. Other entries of
    `output_dir` (e.g. a defense's `undefended/` cell) are not touched.
    """
    work = Path(tempfile.mkdtemp(prefix=".partial-", dir=output_dir))
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    (output_dir / METRICS_FILE).unlink(missing_ok=True)
    for name in CELL_ARTEFACTS:
        if name == METRICS_FILE:
            continue
        old = output_dir / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        if (work / name).exists():
            os.replace(work / name, old)
    if (work / METRICS_FILE).exists():
        os.replace(work / METRICS_FILE, output_dir / METRICS_FILE)
    shutil.rmtree(work, ignore_errors=True)


def reset_peak_rss() -> bool:
    """Start a new peak-memory window for [`peak_rss_megabytes`] (Linux `/proc/self/clear_refs`); False if unsupported.

    A bench runs many cells in one process; without the reset each cell's peak would include every earlier one.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_megabytes() -> Optional[float]:
    """Peak resident memory in MiB since the last [`reset_peak_rss`] (Linux `VmHWM`), else of the whole process so far
    (`resource.getrusage`); None where neither is available."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


def read_cell_info(adapter_dir: Path, filename: str, kind: str) -> dict[str, Any]:
    """The JSON `filename` a saved cell keeps beside its adapter; a one-line error when it is not there."""
    info_path = adapter_dir / filename
    if not adapter_dir.is_dir():
        raise ValueError(
            f"{adapter_dir}: adapter directory {'is not a directory' if adapter_dir.exists() else 'does not exist'}."
        )
    if not info_path.is_file():
        raise ValueError(f"{adapter_dir}: not a saved {kind} cell ({filename} is missing).")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{info_path}: not valid JSON ({error}).") from None
    if not isinstance(info, dict):
        raise ValueError(f"{info_path}: expected a JSON object, got {type(info).__name__}.")
    return info


#: The decisions a row-filtered run adds to its report after the summary, copied to the cell when made.
_DECISION_SECTIONS = ("plain_training", "isolated_rows", "unlearning", "bias_refit", "weight_average")


def save_row_filter(report: dict[str, Any], train_data: LoadedData, output_dir: Path) -> dict[str, Any]:
    """Write the per-row decisions, with each row's text and label, to the cell's `row_filter.json`; return the
    summary (and the plain-training decision, the isolated rows', the unlearning phase's, the bias refit's and the
    weight average's, when they were made) plus what the poison flags say of it (flags are read for this report
    only, never by the filter): the clean rows not trained on, the poisoned rows flagged, and, where contradicted
    rows train on the trusted teacher's distribution, the share of each so taught."""
    rows = [
        {"index": index, "text": record.text, "label": record.label, **decision}
        for index, (record, decision) in enumerate(zip(train_data.records, report["rows"]))
    ]
    phase, refit, reference = report.get("unlearning"), report.get("bias_refit"), report.get("reference")
    plain, isolated, average = report.get("plain_training"), report.get("isolated_rows"), report.get("weight_average")
    decisions = {name: report[name] for name in _DECISION_SECTIONS if report.get(name)}
    write_json(
        output_dir / ROW_FILTER_FILE,
        {"summary": report["summary"], **decisions, "rows": rows, **({"reference": reference} if reference else {})},
    )
    flagged = [decision["reason"] != "keep" for decision in report["rows"]]
    trained, teacher_only = trained_rows(report, report["summary"].get("contradicted_action", "drop"))
    trained_set, taught_set = set(trained), {index for index, only in zip(trained, teacher_only) if only}
    dropped = [index not in trained_set for index in range(len(flagged))]
    taught = [index in taught_set for index in range(len(flagged))]
    poisoned = [record.poisoned for record in train_data.records]
    clean_rows, poisoned_rows = poisoned.count(False), poisoned.count(True)
    keys = ("isolated", "skipped", "cap", "chosen_step", "guard_start", "guard_end", "seconds")
    unlearning = {f"unlearn_{key}": phase.get(key) for key in keys} if phase else {}
    if phase and phase.get("evidence"):
        unlearning["unlearn_evidence_z"] = phase["evidence"]["z"]
    return {
        **report["summary"],
        **unlearning,
        **({"plain_training": plain["plain"]} if plain else {}),
        **({"isolated_kept": isolated["kept"]} if isolated else {}),
        **({"bias_offset": refit["offset"]} if refit else {}),
        **({"weight_average_kept": average["kept"]} if average else {}),
        "clean_dropped": sum(d and not p for d, p in zip(dropped, poisoned)) / max(clean_rows, 1),
        "poisoned_recall": sum(f and p for f, p in zip(flagged, poisoned)) / poisoned_rows if poisoned_rows else None,
        **(
            {  # rows trained on the trusted teacher's distribution in place of their label
                "clean_taught": sum(t and not p for t, p in zip(taught, poisoned)) / max(clean_rows, 1),
                "poisoned_taught": sum(t and p for t, p in zip(taught, poisoned)) / poisoned_rows
                if poisoned_rows
                else None,
            }
            if any(taught)
            else {}
        ),
    }
