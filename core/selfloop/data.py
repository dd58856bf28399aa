"""The data contract between stages: a ``datasets.Dataset`` with fixed columns.

Required columns: ``id, prompt, completions, answer, reference, difficulty, round, source``;
optional (the core adds them with defaults when missing): ``temperature`` and
``completion_logprobs`` (sampling metadata); plus one ``score_<name>`` column per filter
that ran. ``reference`` is ground truth; the loop removes it before data reaches filters
and optimizers (the label-free guarantee).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from selfloop.errors import ContractError

if TYPE_CHECKING:
    from datasets import Dataset, Features

REQUIRED = ("id", "prompt", "completions", "answer", "reference", "difficulty", "round", "source")
# Sampling metadata (added in 0.2): the temperature the completions were sampled at (None:
# not sampled, e.g. bootstrap labels) and each completion's mean token log-probability under
# the model that wrote it (empty when unknown).
# refine_trace (JSON of Generation.extra without "sampling": self-correction turns, the
# chain-of-thought rationale, retrieved passages) lets optimizers train on rationales.
OPTIONAL = ("temperature", "completion_logprobs", "refine_trace")
COLUMNS = REQUIRED + OPTIONAL
EMPTY = "empty-dataset.json"
# What a filter or optimizer sees: everything but the references.
BLIND_COLUMNS = tuple(c for c in COLUMNS if c != "reference")


def features() -> Features:
    from datasets import Features, Sequence, Value

    return Features(
        {
            "id": Value("string"),
            "prompt": Value("string"),
            "completions": Sequence(Value("string")),
            "answer": Value("string"),
            "reference": Value("string"),
            "difficulty": Value("int32"),
            "round": Value("int32"),
            "source": Value("string"),
            "temperature": Value("float32"),
            "completion_logprobs": Sequence(Value("float32")),
            "refine_trace": Value("string"),
        }
    )


def make_rows(rows: Iterable[dict[str, Any]]) -> Dataset:
    """Build a contract-conforming Dataset from dicts (missing optional fields are filled)."""
    from datasets import Dataset

    columns: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for i, row in enumerate(rows):
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ContractError(f"row {i} has unknown fields {sorted(unknown)}; the contract's columns are {COLUMNS}")
        for c in ("id", "prompt", "answer"):
            if row.get(c) is None:
                raise ContractError(f"row {i} lacks required field {c!r}")
        columns["id"].append(str(row["id"]))
        columns["prompt"].append(row["prompt"])
        columns["completions"].append(list(row.get("completions") or []))
        columns["answer"].append(row["answer"])
        columns["reference"].append(row.get("reference"))
        columns["difficulty"].append(int(row.get("difficulty", 0)))
        columns["round"].append(int(row.get("round", 0)))
        columns["source"].append(str(row.get("source", "")))
        columns["temperature"].append(row.get("temperature"))
        columns["completion_logprobs"].append(list(row.get("completion_logprobs") or []))
        columns["refine_trace"].append(row.get("refine_trace"))
    return Dataset.from_dict(columns, features=features())


def conform(data: Dataset) -> Dataset:
    """Add the optional contract columns a Dataset lacks (data written before 0.2, or by a
    plugin that builds its Dataset by hand), with their defaults and types."""
    missing = [c for c in OPTIONAL if c not in data.column_names]
    if not missing:
        return data
    feats = features()
    for column in missing:
        default = [] if column == "completion_logprobs" else None
        data = data.add_column(column, [default] * len(data), feature=feats[column])
    return data


def check_dataset(data: Any, culprit: str, required: Iterable[str] = REQUIRED) -> Dataset:
    """Raise ContractError naming ``culprit`` unless ``data`` is a Dataset with the columns."""
    from datasets import Dataset

    if not isinstance(data, Dataset):
        raise ContractError(f"{culprit} returned {type(data).__name__}; expected a datasets.Dataset")
    missing = [c for c in required if c not in data.column_names]
    if missing:
        raise ContractError(f"{culprit} returned a Dataset without the column(s) {missing}; required: {list(required)}")
    ids = data["id"]
    if len(set(ids)) != len(ids):
        raise ContractError(f"{culprit} returned duplicate row ids")
    return data


def check_filtered(before: Dataset, after: Any, culprit: str, score_column: str) -> Dataset:
    """A filter may only drop rows, and must add its score column."""
    after = check_dataset(after, culprit, [c for c in BLIND_COLUMNS if c in REQUIRED])
    if score_column not in after.column_names:
        raise ContractError(f"{culprit} did not add its score column {score_column!r}")
    extra = set(after["id"]) - set(before["id"])
    if extra:
        raise ContractError(f"{culprit} added rows {sorted(extra)[:3]}...; a filter may only drop rows")
    # Hand the next filter a plain table: add_column breaks on a selection's indices
    # mapping, and on some empty tables left by one.
    if not len(after):
        from datasets import Dataset

        return Dataset.from_dict({c: [] for c in after.column_names}, features=after.features)
    return after.flatten_indices() if after._indices is not None else after


def blind(data: Dataset) -> Dataset:
    """The data without ground truth: what filters and optimizers are allowed to see."""
    return data.remove_columns([c for c in ("reference",) if c in data.column_names])


def save(data: Dataset, path: Path) -> None:
    """Save a Dataset (Arrow); an empty one keeps its schema (datasets cannot reload 0 shards)."""
    if len(data):
        data.save_to_disk(str(path))
    else:
        path.mkdir(parents=True, exist_ok=True)
        (path / EMPTY).write_text(json.dumps(data.features.to_dict()))


def load(path: Path) -> Dataset:
    from datasets import Dataset, Features, load_from_disk

    if (path / EMPTY).exists():
        feats = Features.from_dict(json.loads((path / EMPTY).read_text()))
        return Dataset.from_dict({k: [] for k in feats}, features=feats)
    return load_from_disk(str(path))


def concat(parts: list[Dataset]) -> Dataset:
    from datasets import concatenate_datasets

    parts = [conform(p) for p in parts if p is not None]
    if not parts:
        return make_rows([])
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def jsonable(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null, tuples and sets lists."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def generation_columns(generation: Any) -> dict[str, Any]:
    """The row fields an acquirer takes from a Generation besides its answer: sampling
    metadata and the refiners' trace."""
    sampling = generation.extra.get("sampling") or {}
    trace = {k: v for k, v in generation.extra.items() if k != "sampling"}
    return {
        "completions": generation.completions,
        "temperature": sampling.get("temperature"),
        "completion_logprobs": sampling.get("logprobs") or [],
        "refine_trace": json.dumps(jsonable(trace)) if trace else None,
    }
