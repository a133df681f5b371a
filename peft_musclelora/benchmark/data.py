"""Loaders for backdoor text-classification data into one small typed form.

Three inputs are understood:

* the OpenBackdoor CSV layout (header `,0,1,2`: unnamed index, text, label, poison flag), as in the shared data;
* plain TSV/CSV with a header naming a text column (`text` or `sentence`) and a `label` column, optionally
  `poisoned` (SST-2's raw `sentence<TAB>label` files are of this kind);
* any `datasets.Dataset` with named columns.

Every loader returns a [`LoadedData`]: a list of [`Record`] (text, label, poisoned) plus the rows it skipped and why.
Malformed input raises a one-line `ValueError` naming the file, the line and the offending field and value.
Nothing is dropped silently: the only rows skipped are blank lines and rows whose text is empty, and they are
counted in `LoadedData.skipped` and logged.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import datasets

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

OPENBACKDOOR_HEADER = ["", "0", "1", "2"]
TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMN = "label"
POISONED_COLUMN = "poisoned"
DATA_ENV_VAR = "MUSCLELORA_DATA"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"
ATTACK_SPLITS = (
    "train-mixed-0.1",
    "train-clean",
    "train-poison",
    "dev-clean",
    "dev-poison",
    "test-clean",
    "test-poison",
)


@dataclass(frozen=True)
class Record:
    """One labelled text. `poisoned` is True when the row carries a backdoor trigger."""

    text: str
    label: int
    poisoned: bool = False


@dataclass(frozen=True)
class Skipped:
    """A row that was not loaded: where it was (`line` in the file, or dataset index) and why."""

    line: int
    reason: str


@dataclass
class LoadedData:
    """Records loaded from one source, with the rows that were skipped.

    Args:
        records: The loaded rows, in file order.
        source: The file path or dataset name they came from (used in error messages and result files).
        num_labels: Number of classes; every label is in `[0, num_labels)`.
        skipped: Rows not loaded (blank lines, empty text), with their line and reason.
    """

    records: list[Record]
    source: str
    num_labels: int = 2
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def texts(self) -> list[str]:
        """The texts, in order."""
        return [record.text for record in self.records]

    @property
    def labels(self) -> list[int]:
        """The labels, in order."""
        return [record.label for record in self.records]

    @property
    def num_poisoned(self) -> int:
        """How many rows carry a trigger."""
        return sum(record.poisoned for record in self.records)

    def skipped_summary(self) -> dict[str, int]:
        """Count of skipped rows per reason."""
        return dict(Counter(skip.reason for skip in self.skipped))

    def replace(self, records: list[Record], source: Optional[str] = None) -> LoadedData:
        """A copy holding `records` (and, optionally, a new `source`), keeping labels count and skipped rows."""
        return LoadedData(records, source or self.source, self.num_labels, list(self.skipped))

    def subsample(self, max_rows: Optional[int], seed: int) -> LoadedData:
        """At most `max_rows` rows drawn without replacement (seeded), in their original order; all when None."""
        if max_rows is None or max_rows >= len(self.records):
            return self
        if max_rows < 1:
            raise ValueError(f"{self.source}: max_rows must be >= 1, got {max_rows!r}.")
        keep = sorted(random.Random(seed).sample(range(len(self.records)), max_rows))
        return self.replace([self.records[i] for i in keep], f"{self.source} (subsample {max_rows}, seed {seed})")

    def to_hf_dataset(self) -> Any:
        """The records as a `datasets.Dataset` with columns `text`, `label`, `poisoned`."""

        return datasets.Dataset.from_dict(
            {"text": self.texts, "label": self.labels, "poisoned": [r.poisoned for r in self.records]}
        )

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description: source, rows, poisoned rows, label counts, skipped rows per reason."""
        return {
            "source": self.source,
            "rows": len(self.records),
            "poisoned": self.num_poisoned,
            "labels": {str(k): v for k, v in sorted(Counter(self.labels).items())},
            "skipped": self.skipped_summary(),
        }


def _parse_label(value: object, num_labels: int, where: str, column: str) -> int:
    text = str(value).strip() if not isinstance(value, bool) else repr(value)
    try:
        label = int(text)
    except ValueError:
        raise ValueError(f"{where}: field {column!r} must be an integer label, got {value!r}.") from None
    if not 0 <= label < num_labels:
        raise ValueError(f"{where}: field {column!r} = {label} is out of range, expected 0..{num_labels - 1}.")
    return label


def _parse_flag(value: object, where: str, column: str) -> bool:
    text = str(value).strip().lower()
    if text in ("0", "false"):
        return False
    if text in ("1", "true"):
        return True
    raise ValueError(f"{where}: field {column!r} must be a poison flag 0 or 1, got {value!r}.")


def _read_utf8(path: Path) -> str:
    """The file's text; a `ValueError` naming the file, line and byte when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path} line {line}: not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); "
            "re-encode the file as UTF-8."
        ) from None


def _rows(reader: Any, path: Path) -> Iterable[list[str]]:
    """The reader's rows, with the csv module's errors (a field over the size limit, a NUL byte) naming the line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            detail = str(error)
            if "field larger than field limit" in detail:
                detail = f"a field is longer than the CSV field limit of {csv.field_size_limit()} characters"
            raise ValueError(f"{path} line {reader.line_num}: malformed CSV row: {detail}.") from None
        yield row


def _check_text(text: str, where: str, column: str) -> str:
    # A NUL byte is never part of a review: it marks a binary or corrupted file, and tokenizers drop it silently.
    if "\x00" in text:
        raise ValueError(
            f"{where}: field {column!r} holds a NUL byte (\\x00): {text[:60]!r}; the file looks corrupted."
        )
    return text


def _check_num_labels(num_labels: int) -> None:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}.")


def load_records(path: PathLike, num_labels: int = 2, text_column: Optional[str] = None) -> LoadedData:
    """Load a CSV/TSV file in the OpenBackdoor layout or with named `text`/`sentence` and `label` columns.

    The layout is detected from the header: `,0,1,2` is OpenBackdoor (text, label, poison flag); otherwise the header
    must name a text column (`text_column`, else `text` or `sentence`) and `label`, and may name `poisoned`.
    Files ending in `.tsv` are tab-separated and read without quote processing (SST-2's raw files contain bare
    quotes); other files are comma-separated CSV.

    Args:
        path: The file to read.
        num_labels: Number of classes; labels must be integers in `[0, num_labels)`.
        text_column: Name of the text column for files with named columns.

    Raises:
        ValueError: The file is missing or empty, a column is missing, or a row has a bad label or poison flag.
            The message names the file and line.
    """
    _check_num_labels(num_labels)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such data file.")
    is_tsv = path.suffix.lower() == ".tsv"
    with io.StringIO(_read_utf8(path), newline="") as handle:
        if is_tsv:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.reader(handle)
        rows = _rows(reader, path)
        header = next(rows, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(rows, None)
        if header is None:
            raise ValueError(f"{path}: file is empty, expected a header row and data rows.")
        header = [cell.strip() for cell in header]
        if header == OPENBACKDOOR_HEADER:
            text_idx, label_idx, flag_idx = 1, 2, 3
            names = ("0 (text)", "1 (label)", "2 (poison flag)")
        else:
            wanted_text = (text_column,) if text_column else TEXT_COLUMNS
            text_idx = next((header.index(name) for name in wanted_text if name in header), None)
            if text_idx is None:
                raise ValueError(
                    f"{path}: missing text column, expected one of {list(wanted_text)} or the OpenBackdoor header "
                    f"',0,1,2'; header is {header}."
                )
            if LABEL_COLUMN not in header:
                raise ValueError(f"{path}: missing column {LABEL_COLUMN!r}; header is {header}.")
            label_idx = header.index(LABEL_COLUMN)
            flag_idx = header.index(POISONED_COLUMN) if POISONED_COLUMN in header else None
            names = (header[text_idx], LABEL_COLUMN, POISONED_COLUMN)
        needed = max(i for i in (text_idx, label_idx, flag_idx) if i is not None) + 1

        records: list[Record] = []
        skipped: list[Skipped] = []
        for row in rows:
            line = reader.line_num
            where = f"{path} line {line}"
            if not any(cell.strip() for cell in row):
                skipped.append(Skipped(line, "blank line"))
                continue
            if len(row) < needed:
                raise ValueError(f"{where}: expected {needed} fields ({header}), got {len(row)}: {row!r}.")
            text = _check_text(row[text_idx].strip(), where, names[0])
            label = _parse_label(row[label_idx], num_labels, where, names[1])
            poisoned = _parse_flag(row[flag_idx], where, names[2]) if flag_idx is not None else False
            if not text:
                skipped.append(Skipped(line, "empty text"))
                continue
            records.append(Record(text, label, poisoned))
    if not records:
        raise ValueError(f"{path}: no data rows after the header ({len(skipped)} blank or empty-text rows).")
    loaded = LoadedData(records, str(path), num_labels, skipped)
    if skipped:
        logger.warning("%s: skipped %d rows %s", path, len(skipped), loaded.skipped_summary())
    return loaded


def load_dataset_records(
    dataset: Any,
    text_column: str = "text",
    label_column: str = "label",
    poisoned_column: Optional[str] = None,
    num_labels: int = 2,
    name: str = "<datasets.Dataset>",
) -> LoadedData:
    """Load a `datasets.Dataset` (or any sequence of dicts) with named columns.

    Args:
        dataset: The rows; `dataset.column_names` is checked when present.
        text_column: Column holding the text.
        label_column: Column holding the integer label.
        poisoned_column: Column holding the poison flag; `"poisoned"` is used when present and this is None.
        num_labels: Number of classes; labels must be integers in `[0, num_labels)`.
        name: How the dataset is named in error messages and result files.
    """
    _check_num_labels(num_labels)
    columns = list(getattr(dataset, "column_names", None) or (dataset[0].keys() if len(dataset) else []))
    if len(dataset) == 0:
        raise ValueError(f"{name}: dataset is empty.")
    for column in (text_column, label_column):
        if column not in columns:
            raise ValueError(f"{name}: missing column {column!r}; columns are {columns}.")
    if poisoned_column is None and POISONED_COLUMN in columns:
        poisoned_column = POISONED_COLUMN
    if poisoned_column is not None and poisoned_column not in columns:
        raise ValueError(f"{name}: missing column {poisoned_column!r}; columns are {columns}.")
    records: list[Record] = []
    skipped: list[Skipped] = []
    for index, row in enumerate(dataset):
        where = f"{name} row {index}"
        text = row[text_column]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {text_column!r} must be a string, got {text!r}.")
        _check_text(text, where, text_column)
        label = _parse_label(row[label_column], num_labels, where, label_column)
        poisoned = _parse_flag(row[poisoned_column], where, poisoned_column) if poisoned_column else False
        if not text.strip():
            skipped.append(Skipped(index, "empty text"))
            continue
        records.append(Record(text.strip(), label, poisoned))
    if not records:
        raise ValueError(f"{name}: every row has empty text ({len(skipped)} rows).")
    loaded = LoadedData(records, name, num_labels, skipped)
    if skipped:
        logger.warning("%s: skipped %d rows %s", name, len(skipped), loaded.skipped_summary())
    return loaded


def from_records(records: Iterable[Record], source: str, num_labels: int = 2) -> LoadedData:
    """Wrap records built in code (e.g. by a poisoner) as [`LoadedData`]."""
    return LoadedData(list(records), source, num_labels)


DataSource = Union[PathLike, LoadedData]


def as_data(source: DataSource, num_labels: int = 2) -> LoadedData:
    """`source` itself when it is already [`LoadedData`], else the file it names, read with [`load_records`]."""
    return source if isinstance(source, LoadedData) else load_records(source, num_labels=num_labels)


@dataclass(frozen=True)
class AttackFiles:
    """The files of one attack in the shared data (OpenBackdoor layout)."""

    attack: str
    train: Path
    dev: Path
    dev_poison: Path
    test_clean: Path
    test_poison: Path
    train_clean: Optional[Path] = None  # None: the data has no unpoisoned copy of the training set (no oracle)


@dataclass(frozen=True)
class SharedData:
    """The shared backdoor data directory: `sst-2/raw/*.tsv` and `sst-2/poison/<attack>/*.csv`.

    Use [`SharedData.resolve`] to find it from `--data`, the `MUSCLELORA_DATA` environment variable or
    `../shared/data` relative to the current directory, in that order.
    """

    root: Path
    task: str = "sst-2"

    @classmethod
    def resolve(cls, data_dir: Optional[PathLike] = None, task: str = "sst-2") -> SharedData:
        """Find the data directory; raise a `ValueError` listing where it looked when none exists."""
        tried: list[str] = []
        candidates: list[tuple[str, Optional[PathLike]]] = [
            ("--data", data_dir),
            (DATA_ENV_VAR, os.environ.get(DATA_ENV_VAR) or None),
            ("default", DEFAULT_DATA_DIR if data_dir is None and not os.environ.get(DATA_ENV_VAR) else None),
        ]
        for origin, candidate in candidates:
            if candidate is None:
                continue
            path = Path(candidate).expanduser()
            if path.is_dir():
                return cls(path.resolve(), task)
            tried.append(f"{origin}={path}")
            if origin != "default":
                break  # an explicit choice that does not exist is an error, not a reason to look elsewhere
        raise ValueError(
            f"Shared data directory not found (tried {', '.join(tried)}): pass --data DIR or set {DATA_ENV_VAR}."
        )

    def attacks(self) -> list[str]:
        """The attacks present under `<task>/poison/`."""
        poison = self.root / self.task / "poison"
        return sorted(p.name for p in poison.iterdir() if p.is_dir()) if poison.is_dir() else []

    def raw(self, split: str) -> Path:
        """Path of the raw (unpoisoned) TSV split: `train`, `dev` or `test`."""
        path = self.root / self.task / "raw" / f"{split}.tsv"
        if not path.is_file():
            raise ValueError(f"{path}: raw split {split!r} not found in {self.root}.")
        return path

    def path(self, attack: str, split: str) -> Path:
        """Path of one attack file, e.g. `path("badnets", "test-poison")`."""
        if split not in ATTACK_SPLITS:
            raise ValueError(f"split must be one of {list(ATTACK_SPLITS)}, got {split!r}.")
        directory = self.root / self.task / "poison" / attack
        if not directory.is_dir():
            raise ValueError(
                f"attack {attack!r} not found in {self.root / self.task / 'poison'}; have {self.attacks()}."
            )
        path = directory / f"{split}.csv"
        if not path.is_file():
            raise ValueError(f"{path}: file of attack {attack!r} split {split!r} is missing.")
        return path

    def attack_files(self, attack: str) -> AttackFiles:
        """All files of one attack; raises a `ValueError` naming the first one missing.

        `train-clean.csv` (only the `oracle` baseline reads it) may be absent: `train_clean` is then None.
        """
        clean = self.root / self.task / "poison" / attack / "train-clean.csv"
        return AttackFiles(
            attack=attack,
            train=self.path(attack, "train-mixed-0.1"),
            dev=self.path(attack, "dev-clean"),
            dev_poison=self.path(attack, "dev-poison"),
            test_clean=self.path(attack, "test-clean"),
            test_poison=self.path(attack, "test-poison"),
            train_clean=clean if clean.is_file() else None,
        )


def label_counts(records: Sequence[Record]) -> dict[int, int]:
    """Number of records per label."""
    return dict(Counter(record.label for record in records))
