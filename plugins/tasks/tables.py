"""Reading tables for ``task=dataset``: a source (file, saved directory, ``builtin:NAME``,
hub name) as a memory-mapped ``datasets.Dataset``, its columns checked, and its rows split by
difficulty level into NumPy arrays of row numbers. Nothing here builds Python lists of rows.
"""

from __future__ import annotations

import bisect
import codecs
from pathlib import Path

from selfloop.errors import OptionError, SelfloopError

OPTION = "task.dataset."
BUILTIN = "builtin:"
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow"}
TEXT_FORMATS = {".jsonl", ".json", ".csv", ".tsv"}


def builtin_files() -> dict[str, Path]:
    from importlib import resources

    root = resources.files("selfloop_plugins.tasks") / "data"
    return {Path(f.name).stem: Path(str(f)) for f in root.iterdir() if Path(f.name).suffix in FILE_FORMATS}


def check_utf8(path: Path, option: str) -> None:
    """Fail with the line of the first byte that is not UTF-8 (datasets would load it and
    break later, deep inside Arrow)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done, lines = 0, 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = done + exc.start
                line = lines + chunk[: exc.start].count(b"\n") + 1
                raise SelfloopError(
                    f"{option}={str(path)!r} is not UTF-8 text (byte {chunk[exc.start]:#04x} at offset {at}, line {line}); "
                    f"re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
                ) from None
            done += len(chunk)
            lines += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise SelfloopError(f"{option}={str(path)!r} is not UTF-8 text (it ends inside a multi-byte character); re-encode it as UTF-8") from None


def root_cause(exc: BaseException) -> str:
    """The most specific message in an exception chain (datasets wraps Arrow's errors)."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    useful = [e for e in chain if type(e).__name__ not in ("DatasetGenerationError", "StopIteration") and str(e).strip()]
    best = useful[0] if useful else chain[0]
    text = str(best).strip().splitlines()[0] if str(best).strip() else type(best).__name__
    return f"{type(best).__name__}: {text}"


def is_saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def open_source(spec: str, name: str | None, split: str, option: str, split_option: str):
    """A memory-mapped ``datasets.Dataset`` for ``spec`` (see ``DatasetConfig.path``);
    ``option`` and ``split_option`` name the options that chose it, for the messages."""
    import datasets

    accepted = "a .jsonl/.json/.csv/.tsv/.parquet/.arrow file, a saved datasets directory, builtin:NAME or a datasets hub name"
    if not spec:
        raise OptionError(option, spec, accepted)
    if spec.startswith(BUILTIN):
        files = builtin_files()
        key = spec[len(BUILTIN):]
        if key not in files:
            raise OptionError(option, spec, f"builtin:NAME with NAME one of {', '.join(sorted(files)) or '(none shipped)'}")
        path = files[key]
    else:
        path = Path(spec).expanduser()
    where = f"{option}={spec!r}" + (f" ({split_option}={split!r})" if split != "train" else "")
    try:
        if path.is_file():
            fmt = FILE_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise OptionError(option, spec, f"{accepted} (unknown file type {path.suffix or '(none)'!r})")
            if path.stat().st_size == 0:
                raise SelfloopError(f"{where}: the file is empty")
            if path.suffix.lower() in TEXT_FORMATS:
                check_utf8(path, option)
            extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            data = datasets.load_dataset(fmt, data_files=str(path), split=split, **extra)
        elif path.is_dir() and is_saved_dataset(path):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise OptionError(split_option, split, f"a split of {spec}: {', '.join(data)}")
                data = data[split]
        elif path.is_dir():
            data = datasets.load_dataset(str(path), name, split=split)
        elif spec.startswith((".", "/", "~")) or path.suffix.lower() in FILE_FORMATS:
            raise OptionError(option, spec, f"{accepted} (no such file or directory)")
        else:
            try:
                data = datasets.load_dataset(spec, name, split=split)
            except Exception as exc:
                raise SelfloopError(f"{where}: not a local file or directory, and loading it with datasets.load_dataset failed (offline, or no such hub dataset?): {root_cause(exc)}") from None
    except SelfloopError:
        raise
    except Exception as exc:
        raise SelfloopError(f"{where}: could not read it: {root_cause(exc)}") from None
    if not isinstance(data, datasets.Dataset):
        raise SelfloopError(f"{where}: expected one table, got {type(data).__name__}; name its split (task.dataset.split)")
    if data._indices is not None:  # a view saved after select(): make row numbers physical
        data = data.flatten_indices()
    if len(data) == 0:
        raise SelfloopError(f"{where}: it has no rows")
    return data


# -- columns -------------------------------------------------------------------------------------
def first_row(mask) -> int:
    import numpy as np

    return int(np.flatnonzero(mask)[0])


def column(data, option: str, column_name: str, source: str):
    if column_name not in data.column_names:
        import difflib

        close = difflib.get_close_matches(column_name, data.column_names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(f"{OPTION}{option}", column_name, f"a column of {source}: {', '.join(data.column_names)}{hint}")
    return data.data.table.column(column_name)


def text_column(data, option: str, column_name: str, source: str):
    """The prompt column, checked: text, no nulls, no empty strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = column(data, option, column_name, source)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        example = next((v for v in col.slice(0, 1).to_pylist()), None)
        raise OptionError(f"{OPTION}{option}", column_name, f"a column of text; in {source} it holds {col.type} values (e.g. {example!r})")
    if col.null_count:
        row = first_row(col.is_null().to_numpy(zero_copy_only=False))
        raise SelfloopError(f"{source}: {col.null_count} rows have no {option.split('_')[0]} in column {column_name!r} (null), e.g. row {row}; remove or fill them")
    if pc.any(pc.equal(pc.utf8_length(col), 0)).as_py():
        empty = pc.equal(pc.utf8_length(col), 0).to_numpy(zero_copy_only=False)
        raise SelfloopError(f"{source}: {int(empty.sum())} rows have an empty {column_name!r}, e.g. row {first_row(empty)}; remove or fill them")
    return col


def reference_strings(col, column_name: str, source: str):
    """The reference column as Arrow text (numbers become their shortest text, 3.0 -> '3')."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_null(t):
        return pc.cast(col, pa.string())
    example = next((v for v in col.drop_null().slice(0, 1).to_pylist()), None)
    raise OptionError(f"{OPTION}reference_column", column_name, f"a column of text or numbers; in {source} it holds {t} values (e.g. {example!r}); flatten it first")


def difficulties(data, column_name: str | None, source: str):
    """One integer level per row (1 for every row without a difficulty column)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if column_name is None:
        return np.ones(len(data), dtype=np.int32)
    col = column(data, "difficulty_column", column_name, source)
    if col.null_count:
        row = first_row(col.is_null().to_numpy(zero_copy_only=False))
        raise SelfloopError(f"{source}: {col.null_count} rows have no difficulty in column {column_name!r} (null), e.g. row {row}")
    bad = OptionError(f"{OPTION}difficulty_column", column_name, f"a column of integer levels; in {source} it holds {col.type} values")
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            col = pc.cast(pc.utf8_trim_whitespace(col), pa.int64())
        except pa.ArrowInvalid:
            example = col.slice(0, 1).to_pylist()[0]
            raise OptionError(f"{OPTION}difficulty_column", column_name, f"a column of integer levels; in {source} it holds text such as {example!r}") from None
    if pa.types.is_floating(col.type):
        if not pc.all(pc.equal(col, pc.round(col))).as_py():  # NaN and inf fail too
            raise bad
    elif not pa.types.is_integer(col.type):
        raise bad
    lo, hi = pc.min_max(col).values()
    if lo.as_py() < -(2**31) or hi.as_py() >= 2**31:
        raise OptionError(f"{OPTION}difficulty_column", column_name, f"integer levels between -2**31 and 2**31; {source} has {lo.as_py()}..{hi.as_py()}")
    return pc.cast(col, pa.int32()).to_numpy()


def characters(col) -> set[str]:
    """The distinct characters of an Arrow text column, read from its buffers: ASCII data is
    counted with NumPy without building Python strings."""
    import numpy as np
    import pyarrow as pa

    found: set[str] = set()
    for chunk in col.chunks:
        if not len(chunk):
            continue
        offsets_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        _, offsets_buf, data_buf = chunk.buffers()
        if data_buf is None:
            continue
        offsets = np.frombuffer(offsets_buf, dtype=offsets_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        raw = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
        counts = np.bincount(raw, minlength=256)
        if counts[128:].any():  # non-ASCII: decode this chunk's bytes once
            found |= set(raw.tobytes().decode("utf-8"))
        else:
            found |= {chr(b) for b in np.flatnonzero(counts)}
    return found


# -- splits ----------------------------------------------------------------------------------------
class Rows:
    """One source's prompt and reference columns, and the row numbers of a split by level."""

    def __init__(self, data, prompts, references, by_level: dict):
        self.data = data  # keeps the memory map alive
        self.prompts, self.references, self.by_level = prompts, references, by_level
        self._prompts = self._index(prompts)
        self._references = self._index(references) if references is not None else None

    @staticmethod
    def _index(chunked) -> tuple[list, list[int]]:
        chunks = [c for c in chunked.chunks if len(c)]
        starts = [0]
        for c in chunks:
            starts.append(starts[-1] + len(c))
        return chunks, starts

    def count(self, level: int) -> int:
        return len(self.by_level.get(level, ()))

    def size(self) -> int:
        return sum(map(len, self.by_level.values()))

    @staticmethod
    def _get(index: tuple[list, list[int]], row: int):
        """One value, read alone: a chunked ``take`` would concatenate every chunk (O(rows))."""
        chunks, starts = index
        c = bisect.bisect_right(starts, row) - 1
        return chunks[c][row - starts[c]].as_py()

    def prompt(self, row: int) -> str:
        return self._get(self._prompts, row)

    def reference(self, row: int) -> str | None:
        if self._references is None:
            return None
        value = self._get(self._references, row)
        return None if value is None else str(value)


def quotas(counts: dict[int, int], size: float, of: int | None = None) -> dict[int, int]:
    """Rows to hold out per level: ``size`` (a share of ``of`` rows, or a count) spread in
    proportion to the levels' rows, at least one per level when ``size`` > 0."""
    total = sum(counts.values())
    want = size * (of or total) if size < 1 else size
    return {level: (min(c, max(1, round(want * c / total))) if want > 0 and c else 0) for level, c in counts.items()}


def group_by_level(rows, diff) -> dict:
    """``{level: rows of that level}``, each keeping the order of ``rows`` (int32 row numbers)."""
    import numpy as np

    if not len(rows):
        return {}
    keys = diff[rows]
    lo, hi = int(keys.min()), int(keys.max())
    if hi - lo < 64:  # a few levels: one pass each, no sort
        present = np.flatnonzero(np.bincount(keys - lo)) + lo
        return {int(lv): rows[keys == lv] for lv in present}
    order = np.argsort(keys, kind="stable")
    values, starts = np.unique(keys[order], return_index=True)
    return {int(lv): rows[idx] for lv, idx in zip(values, np.split(order, starts[1:]))}


def hold_out(diff, eligible, size: float, seed: int, exclude=None) -> dict:
    """Rows to hold out per level (``quotas``), chosen deterministically from ``seed``: the
    first ones of each level in a shuffled order, among ``eligible`` rows not in ``exclude``."""
    import numpy as np

    order = np.arange(len(diff), dtype=np.int32)
    np.random.default_rng(seed).shuffle(order)
    if exclude is not None:
        order = order[~exclude[order]]
    if eligible is not None:
        order = order[eligible[order]]
    groups = group_by_level(order, diff)
    wanted = quotas({lv: len(g) for lv, g in groups.items()}, size, len(diff))
    return {lv: groups[lv][:q].copy() for lv, q in wanted.items() if q}




# -- difficulty without a difficulty column ----------------------------------------------------
def prompt_lengths(col):
    """Characters per prompt, as a NumPy array (one vectorized pass over the Arrow column)."""
    import pyarrow.compute as pc

    return pc.utf8_length(col).to_numpy(zero_copy_only=False)


def quantile_thresholds(values, k: int) -> list:
    """Cut points splitting ``values`` into up to ``k`` quantile bands, band j holding the
    values in (t[j-1], t[j]]. The cut points are data values (numpy's ``lower`` quantiles),
    distinct and below the largest value, so every band holds at least one of ``values``;
    heavy ties (few distinct values) give fewer than ``k`` bands."""
    import numpy as np

    values = np.asarray(values)
    if not len(values):
        return []
    cuts = np.quantile(values, [j / k for j in range(1, k)], method="lower")
    top = values.max()
    return sorted({c.item() for c in cuts if c < top})


def bands(values, thresholds: list):
    """The band (1-based level) of each value under ``quantile_thresholds``' cut points."""
    import numpy as np

    cuts = np.asarray(thresholds, dtype=np.float64)
    return (1 + np.searchsorted(cuts, np.asarray(values, dtype=np.float64), side="left")).astype(np.int32)
