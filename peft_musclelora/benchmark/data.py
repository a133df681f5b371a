"""Loaders for backdoor text-classification data into one small typed form.

Four inputs are understood:

* the OpenBackdoor CSV layout (header `,0,1,2`: unnamed index, text, label, poison flag), as in the shared data;
* plain TSV/CSV with a header naming a text column (`text` or `sentence`, or `text_column`) and a label column
  (`label`, or `label_column`), optionally `poisoned` (SST-2's raw `sentence<TAB>label` files are of this kind);
* JSON Lines (`.jsonl`): one object per line with the same named fields;
* a `datasets.Dataset`, in memory or a directory written by `save_to_disk` (read with `load_from_disk`; nothing is
  ever downloaded).

Labels are integer ids `0..K-1`, or strings mapped to ids by a [`LabelSpace`] (the sorted values of the training
file, or names given in order). [`load_splits`] reads a training file and its dev/test files together: the labels
are found in the training file (or `num_labels` is given) and every other file is checked against them.

Every loader returns a [`LoadedData`]: a list of [`Record`] (text, label, poisoned) plus the rows it skipped and why.
Malformed input raises a one-line `ValueError` naming the file, the line and the offending field and value.
Nothing is dropped silently: the only rows skipped are blank lines and rows whose text is empty, and they are
counted in `LoadedData.skipped` and logged.
"""

from __future__ import annotations

import csv
import io
import json
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
DEFAULT_TASK = "sst-2"
ATTACK_INFO_FILE = "poison.json"  # what `musclelora poison` did, beside the files it wrote
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


def _as_int(value: object) -> Optional[int]:
    """`value` as an integer label, or None when it is not one (bools are not labels)."""
    if isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class LabelSpace:
    """The classes of a task: `num_labels` ids, and for string labels the value each id stands for.

    Args:
        num_labels: Number of classes K; labels are ids `0..K-1`.
        names: For string labels, `names[i]` is the value in the files that id `i` stands for; None for integer
            labels.

    Example:
        >>> labels = LabelSpace(3, ("business", "sports", "tech"))
        >>> labels.parse("sports", "a.csv line 2", "label"), labels.to_dict()
        (1, {'num_labels': 3, 'label_names': ['business', 'sports', 'tech']})
    """

    num_labels: int = 2
    names: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        _check_num_labels(self.num_labels)
        if self.names is not None:
            if len(set(self.names)) != len(self.names):
                raise ValueError(f"label names must be distinct, got {list(self.names)}.")
            if len(self.names) > self.num_labels:
                raise ValueError(f"{len(self.names)} label names {list(self.names)} for num_labels={self.num_labels}.")

    def parse(self, value: object, where: str, column: str) -> int:
        """The id of `value`; a one-line `ValueError` naming `where` for a value outside the labels."""
        if self.names is None:
            return _parse_label(value, self.num_labels, where, column)
        text = str(value).strip()
        if text not in self.names:
            raise ValueError(
                f"{where}: field {column!r} = {text!r} is a label value the training data never has; "
                f"labels are {list(self.names)}."
            )
        return self.names.index(text)

    def check_target(self, target_label: int) -> None:
        """A one-line `ValueError` when `target_label` is not one of the ids."""
        if isinstance(target_label, bool) or not isinstance(target_label, int):
            raise ValueError(f"target_label must be an integer label id, got {target_label!r}.")
        if not 0 <= target_label < self.num_labels:
            named = f" ({', '.join(f'{i}={n}' for i, n in enumerate(self.names))})" if self.names else ""
            raise ValueError(f"target label {target_label} is outside the labels 0..{self.num_labels - 1}{named}.")

    def to_dict(self) -> dict[str, Any]:
        """`num_labels` and, for string labels, `label_names` (what a cell records)."""
        out: dict[str, Any] = {"num_labels": self.num_labels}
        if self.names is not None:
            out["label_names"] = list(self.names)
        return out


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


class NumLabelsError(ValueError):
    """`--num-labels` is smaller than the number of labels the training data has (a usage error, not a bad row)."""


@dataclass
class RawTable:
    """The rows of one file before their labels are parsed: `(where, text, label value, poisoned)`.

    `where` names the file and line (or dataset row) in error messages; `label_column` is how the label field is
    named in them. [`RawTable.to_data`] parses the labels with a [`LabelSpace`].
    """

    source: str
    label_column: str
    rows: list[tuple[str, str, object, bool]]
    skipped: list[Skipped] = field(default_factory=list)

    def label_values(self) -> list[tuple[str, object]]:
        """`(where, label value)` of every row with text."""
        return [(where, label) for where, text, label, _ in self.rows if text]

    def to_data(self, labels: LabelSpace) -> LoadedData:
        """The rows as [`LoadedData`]; a label outside `labels` is a one-line `ValueError` naming file and line."""
        records: list[Record] = []
        skipped = list(self.skipped)
        for where, text, label, poisoned in self.rows:
            label_id = labels.parse(label, where, self.label_column)
            if not text:
                skipped.append(Skipped(_line_of(where), "empty text"))
                continue
            records.append(Record(text, label_id, poisoned))
        if not records:
            raise ValueError(
                f"{self.source}: no data rows after the header ({len(skipped)} blank or empty-text rows)."
            )
        skipped.sort(key=lambda skip: skip.line)
        loaded = LoadedData(records, self.source, labels.num_labels, skipped)
        if skipped:
            logger.warning("%s: skipped %d rows %s", self.source, len(skipped), loaded.skipped_summary())
        return loaded


def _line_of(where: str) -> int:
    return int(where.rsplit(" ", 1)[-1])


def _read_delimited(path: Path, text_column: Optional[str], label_column: Optional[str]) -> RawTable:
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
        if header == OPENBACKDOOR_HEADER and text_column is None and label_column is None:
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
            wanted_label = label_column or LABEL_COLUMN
            if wanted_label not in header:
                raise ValueError(f"{path}: missing column {wanted_label!r}; header is {header}.")
            label_idx = header.index(wanted_label)
            flag_idx = header.index(POISONED_COLUMN) if POISONED_COLUMN in header else None
            names = (header[text_idx], wanted_label, POISONED_COLUMN)
        needed = max(i for i in (text_idx, label_idx, flag_idx) if i is not None) + 1

        table = RawTable(str(path), names[1], [])
        for row in rows:
            line = reader.line_num
            where = f"{path} line {line}"
            if not any(cell.strip() for cell in row):
                table.skipped.append(Skipped(line, "blank line"))
                continue
            if len(row) < needed:
                raise ValueError(f"{where}: expected {needed} fields ({header}), got {len(row)}: {row!r}.")
            text = _check_text(row[text_idx].strip(), where, names[0])
            poisoned = _parse_flag(row[flag_idx], where, names[2]) if flag_idx is not None else False
            table.rows.append((where, text, row[label_idx], poisoned))
    return table


def _read_jsonl(path: Path, text_column: Optional[str], label_column: Optional[str]) -> RawTable:
    wanted_label = label_column or LABEL_COLUMN
    table = RawTable(str(path), wanted_label, [])
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        where = f"{path} line {number}"
        if not line.strip():
            table.skipped.append(Skipped(number, "blank line"))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a JSON object: {error.msg}.") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
        table.rows.append(_named_row(row, where, text_column, wanted_label))
    if not table.rows and not table.skipped:
        raise ValueError(f"{path}: file is empty, expected one JSON object per line.")
    return table


def _named_row(
    row: dict[str, Any], where: str, text_column: Optional[str], label_column: str
) -> tuple[str, str, object, bool]:
    wanted_text = (text_column,) if text_column else TEXT_COLUMNS
    name = next((column for column in wanted_text if column in row), None)
    if name is None:
        raise ValueError(f"{where}: missing text field, expected one of {list(wanted_text)}; fields are {list(row)}.")
    if label_column not in row:
        raise ValueError(f"{where}: missing field {label_column!r}; fields are {list(row)}.")
    text = row[name]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {text!r}.")
    poisoned = _parse_flag(row[POISONED_COLUMN], where, POISONED_COLUMN) if POISONED_COLUMN in row else False
    return where, _check_text(text.strip(), where, name), row[label_column], poisoned


def _read_saved_dataset(path: Path, text_column: Optional[str], label_column: Optional[str]) -> RawTable:
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"{path}: not a dataset written by save_to_disk ({error}).") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(
            f"{path}: a DatasetDict with splits {list(dataset)}; pass one split's directory, e.g. {path / 'train'}."
        )
    wanted_label = label_column or LABEL_COLUMN
    table = RawTable(str(path), wanted_label, [])
    for index, row in enumerate(dataset):
        table.rows.append(_named_row(row, f"{path} row {index}", text_column, wanted_label))
    if not table.rows:
        raise ValueError(f"{path}: dataset is empty.")
    return table


def read_table(path: PathLike, text_column: Optional[str] = None, label_column: Optional[str] = None) -> RawTable:
    """Read one data file (CSV, TSV, JSON Lines) or `save_to_disk` directory, labels still unparsed.

    Raises:
        ValueError: The file is missing or empty, a column is missing, or a row is malformed; the message names the
            file and line.
    """
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path, text_column, label_column)
    if not path.is_file():
        raise ValueError(f"{path}: no such data file.")
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, text_column, label_column)
    return _read_delimited(path, text_column, label_column)


def load_records(
    path: PathLike,
    num_labels: int = 2,
    text_column: Optional[str] = None,
    label_column: Optional[str] = None,
    labels: Optional[LabelSpace] = None,
) -> LoadedData:
    """Load a CSV/TSV file in the OpenBackdoor layout or with named columns, a JSON Lines file or a `save_to_disk`
    directory.

    The CSV layout is detected from the header: `,0,1,2` is OpenBackdoor (text, label, poison flag); otherwise the
    header must name a text column (`text_column`, else `text` or `sentence`) and a label column (`label_column`,
    else `label`), and may name `poisoned`. Files ending in `.tsv` are tab-separated and read without quote
    processing (SST-2's raw files contain bare quotes), `.jsonl` files hold one JSON object per line, other files
    are comma-separated CSV.

    Args:
        path: The file or directory to read.
        num_labels: Number of classes; labels must be integers in `[0, num_labels)`.
        text_column: Name of the text column for files with named columns.
        label_column: Name of the label column for files with named columns.
        labels: The task's labels (string labels mapped to ids); replaces `num_labels`.

    Raises:
        ValueError: The file is missing or empty, a column is missing, or a row has a bad label or poison flag.
            The message names the file and line.
    """
    if labels is None:
        labels = LabelSpace(num_labels)
    return read_table(path, text_column, label_column).to_data(labels)


def find_labels(
    table: RawTable, num_labels: Optional[int] = None, names: Optional[Sequence[str]] = None
) -> LabelSpace:
    """The labels of a task, found in its training `table`, or given as `num_labels` and/or `names`.

    Integer labels must be ids `0..K-1` (K the number of distinct values, or `num_labels` when given, which may not
    be smaller); other values are mapped to ids in sorted order, or in the order of `names`. A training file mixing
    integer and other values needs `names`.
    """
    if num_labels is not None:
        _check_num_labels(num_labels)
    values = table.label_values()
    if names is not None:
        names = tuple(str(name).strip() for name in names)
        found = names
    else:
        ints = [(where, _as_int(value), value) for where, value in values]
        strings = [(where, value) for where, as_int, value in ints if as_int is None]
        if strings and len(strings) < len(ints):
            where, value = strings[0]
            first = next((w, v) for w, a, v in ints if a is not None)
            raise ValueError(
                f"{where}: field {table.label_column!r} = {value!r} is not an integer label while other rows are "
                f"({first[0]}: {first[1]!r}), and no label mapping is given; pass --label-names to map every value."
            )
        if strings:
            found = tuple(sorted({str(value).strip() for _, value in strings}))
        else:
            distinct = sorted({as_int for _, as_int, _ in ints})
            count = len(distinct)
            if num_labels is not None and num_labels < count:
                raise NumLabelsError(
                    f"--num-labels {num_labels} is smaller than the {count} labels found in {table.source}: "
                    f"{distinct}."
                )
            space = LabelSpace(max(num_labels or count, 2))
            for where, value in values:  # ids 0..K-1: a gap or a negative id names its row
                space.parse(value, where, table.label_column)
            return space
    if num_labels is not None and num_labels < len(found):
        raise NumLabelsError(
            f"--num-labels {num_labels} is smaller than the {len(found)} labels found in {table.source}: "
            f"{list(found)}."
        )
    space = LabelSpace(max(num_labels or len(found), 2), found)
    for where, value in values:
        space.parse(value, where, table.label_column)
    return space


def load_splits(
    train: PathLike,
    others: dict[str, PathLike],
    num_labels: Optional[int] = None,
    text_column: Optional[str] = None,
    label_column: Optional[str] = None,
    label_names: Optional[Sequence[str]] = None,
) -> tuple[LabelSpace, LoadedData, dict[str, LoadedData]]:
    """Read a training file and its other splits with one [`LabelSpace`], found in the training file.

    A label in another file that the training file never has is a one-line `ValueError` naming that file and line.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "train.csv").write_text("text,topic\\nshares fell,business\\ngoal,sports\\nchip,tech\\n")
        >>> _ = (folder / "dev.csv").write_text("text,topic\\nmatch,sports\\n")
        >>> labels, train, dev = load_splits(folder / "train.csv", {"dev": folder / "dev.csv"}, label_column="topic")
        >>> labels.names, train.labels, dev["dev"].labels
        (('business', 'sports', 'tech'), [0, 1, 2], [1])
    """
    table = read_table(train, text_column, label_column)
    labels = find_labels(table, num_labels, label_names)
    loaded = {name: read_table(path, text_column, label_column).to_data(labels) for name, path in others.items()}
    return labels, table.to_data(labels), loaded


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
    """A backdoor data directory in the OpenBackdoor layout: `<task>/poison/<attack>/*.csv` (and, optionally,
    `<task>/raw/*.tsv`), `task` one of its folders (default `sst-2`).

    Use [`SharedData.resolve`] to find it from `--data`, the `MUSCLELORA_DATA` environment variable or
    `../shared/data` relative to the current directory, in that order.
    """

    root: Path
    task: str = DEFAULT_TASK

    @classmethod
    def resolve(cls, data_dir: Optional[PathLike] = None, task: str = DEFAULT_TASK) -> SharedData:
        """Find the data directory; raise a `ValueError` listing where it looked when none exists ([`check_task`]
        checks the task)."""
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

    def tasks(self) -> list[str]:
        """The tasks of the data directory: its folders holding a `poison/` folder."""
        return sorted(p.name for p in self.root.iterdir() if (p / "poison").is_dir()) if self.root.is_dir() else []

    def check_task(self) -> None:
        """A one-line `ValueError` listing the tasks when `task` is not one of them."""
        if not (self.root / self.task / "poison").is_dir():
            raise ValueError(
                f"task {self.task!r} not found in {self.root} (no {self.task}/poison/ folder); have {self.tasks()}."
            )

    def attacks(self) -> list[str]:
        """The attacks present under `<task>/poison/`."""
        poison = self.root / self.task / "poison"
        return sorted(p.name for p in poison.iterdir() if p.is_dir()) if poison.is_dir() else []

    def raw(self, split: str) -> Path:
        """Path of the raw (unpoisoned) TSV split: `train`, `dev` or `test` (the `raw/` folder is optional)."""
        path = self.root / self.task / "raw" / f"{split}.tsv"
        if not path.is_file():
            raise ValueError(f"{path}: raw split {split!r} not found in {self.root}.")
        return path

    def path(self, attack: str, split: str) -> Path:
        """Path of one attack file, e.g. `path("badnets", "test-poison")`.

        `train-mixed-0.1` is the poisoned training set: `train-mixed-0.1.csv`, or the one `train-mixed-<rate>.csv`
        of an attack poisoned at another rate (`musclelora poison` names it by its rate).
        """
        if split not in ATTACK_SPLITS:
            raise ValueError(f"split must be one of {list(ATTACK_SPLITS)}, got {split!r}.")
        directory = self.root / self.task / "poison" / attack
        if not directory.is_dir():
            raise ValueError(
                f"attack {attack!r} not found in {self.root / self.task / 'poison'}; have {self.attacks()}."
            )
        path = directory / f"{split}.csv"
        if split == "train-mixed-0.1" and not path.is_file():
            mixed = sorted(directory.glob("train-mixed-*.csv"))
            if len(mixed) > 1:
                raise ValueError(f"{directory}: several poisoned training sets {[p.name for p in mixed]}; keep one.")
            path = mixed[0] if mixed else path
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


def attack_labels(files: AttackFiles, num_labels: Optional[int] = None) -> LabelSpace:
    """The labels of an attack's data: found in its poisoned training set (or `num_labels`), every other file of
    the attack checked against them (a label the training set never has names its file and line)."""
    table = read_table(files.train)
    labels = find_labels(table, num_labels)
    others = [files.dev, files.dev_poison, files.test_clean, files.test_poison, files.train_clean]
    for path in others:
        if path is not None:
            for where, value in read_table(path).label_values():
                labels.parse(value, where, table.label_column)
    return labels


def label_counts(records: Sequence[Record]) -> dict[int, int]:
    """Number of records per label."""
    return dict(Counter(record.label for record in records))
