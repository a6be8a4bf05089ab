"""Where records come from: local ``.json``/``.jsonl``/``.parquet`` files, local dataset
directories, or the Hugging Face Hub; and which format a record is in.

Every record is yielded with its 0-based index and a location for error messages
(``file.jsonl:12``, ``file.json record 3``, ``hub-id [validation] record 7``; numbers 1-based).
A record that cannot even be decoded (malformed JSON, a JSONL line or a parquet string that is
not UTF-8) is yielded as a :class:`BadRecord`, so that the caller decides whether to fail or
skip it. A whole document that cannot be decoded (a ``.json`` file, a UTF-16 file) is an error.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import shutil
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional
from urllib.parse import urlparse

from ..errors import DataError, NetworkError
from ..io import atomic_open
from ..network import PROBE_TIMEOUT_S, env_offline, reachable
from ..pieces import is_utf16, not_utf8, reencode_hint, utf8_lines
from . import bamboogle, counterfact, easyedit, hotpotqa, mquake, musique, plain, rippleedits, twowiki, wikihop

#: format name -> parser module (each has ``FORMAT``, ``sniff(record)``, ``parse(record, ctx)``).
PARSERS = {m.FORMAT: m for m in (hotpotqa, musique, twowiki, wikihop, bamboogle, mquake, rippleedits, counterfact,
                                  easyedit, plain)}
# Most specific first: 2Wiki records also carry HotpotQA's context/supporting_facts.
_SNIFF_ORDER = (counterfact, mquake, rippleedits, easyedit, musique, twowiki, hotpotqa, wikihop, plain, bamboogle)


@dataclass
class BadRecord:
    """A record that could not be decoded (malformed JSON, not UTF-8). ``fix``: how to repair
    it, when not by fixing the record itself."""

    problem: str
    reason: str
    fix: Optional[str] = None


NOT_UTF8 = "not UTF-8"
PARQUET_FIX = "write the file again with its strings in UTF-8"


def sniff_format(record: Any) -> Optional[str]:
    """The format whose fields ``record`` has, or None."""
    if not isinstance(record, Mapping):
        return None
    for module in _SNIFF_ORDER:
        if module.sniff(record):
            return module.FORMAT
    return None


# ----------------------------------------------------------------------------- local files


def iter_local_file(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Yield (index, location, record) from a ``.jsonl``, ``.json`` or ``.parquet`` file.

    A JSONL line that is not UTF-8 is yielded as a :class:`BadRecord` located by the file alone
    (its problem names the byte offset and line).

    Raises:
        DataError: the file is missing, has another suffix, is a JSON document that is not
            UTF-8 or does not parse, is neither an array nor an object with a ``data`` list, or
            is UTF-16 (each message names the file; decoding errors the byte offset).
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file. Pass an existing .json, .jsonl or .parquet file (or a dataset directory) to --from.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use .jsonl, .json (array, or object with a 'data' list) or .parquet.")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, str, Any]]:
    # Skipping lines of a UTF-16 file would skip them all: the whole file is in another encoding.
    if is_utf16(path):
        raise DataError(f"{path}: not UTF-8 at byte 0 (line 1: it starts with a UTF-16 byte-order mark); {reencode_hint(path)}.")
    index = 0
    with open(path, "rb") as fh:
        for lineno, line, problem in utf8_lines(fh):
            if problem is not None:
                yield index, str(path), BadRecord(problem, NOT_UTF8, reencode_hint(path))
                index += 1
                continue
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                obj = BadRecord(f"not valid JSON ({e.msg}; column {e.colno})", "not valid JSON")
            yield index, where, obj
            index += 1


def _iter_json(path: Path) -> Iterator[tuple[int, str, Any]]:
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {not_utf8(e, data[start:], offset=start)}; {reencode_hint(path)}; "
                        f"one JSON document cannot be skipped record by record, even with --skip-bad.") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (it looks like JSON Lines: rename it to .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}; column {e.colno}){hint}. Fix the file; one broken JSON document cannot be skipped record by record.") from None
    if isinstance(doc, Mapping):
        data = doc.get("data")
        if not isinstance(data, list):
            raise DataError(f"{path}: a JSON object must hold its records in a 'data' list (keys found: {', '.join(list(doc)[:8]) or 'none'}); or pass a JSON array.")
        doc = data
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of records or an object with a 'data' list, got {type(doc).__name__}.")
    for i, rec in enumerate(doc):
        yield i, f"{path} record {i + 1}", rec


def _string_problem(err: UnicodeDecodeError, column: Optional[str] = None) -> str:
    """A string value that is not UTF-8, located within its value (columnar data has no lines)."""
    bad = " ".join(f"0x{b:02x}" for b in err.object[err.start:err.end])
    where = f"a string in column '{column}'" if column else "a string"
    return f"not UTF-8: {where} (at byte {err.start} of the value: byte {bad}, {err.reason})"


def _bad_row(columns: Mapping[str, Any], i: int, fix: str, err: UnicodeDecodeError) -> BadRecord:
    """The BadRecord of row ``i`` of arrow ``columns``, whose conversion to Python failed with
    ``err``: located in the column that holds the string that is not UTF-8."""
    for name, column in columns.items():
        try:
            column[i].as_py()
        except UnicodeDecodeError as e:
            return BadRecord(_string_problem(e, name), NOT_UTF8, fix)
    return BadRecord(_string_problem(err), NOT_UTF8, fix)


def _iter_parquet(path: Path) -> Iterator[tuple[int, str, Any]]:
    import pyarrow.parquet as pq  # deferred: pyarrow, for .parquet files only

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for unreadable files
        raise DataError(f"{path}: not a readable parquet file ({e}).") from None
    index = 0
    for batch in pf.iter_batches(batch_size=1024):
        try:
            rows: list[Any] = batch.to_pylist()
        except UnicodeDecodeError:
            # Parquet strings should be UTF-8, but writers do not always check: find the bad rows.
            columns = {name: batch.column(name) for name in batch.schema.names}
            rows = []
            for i in range(batch.num_rows):
                try:
                    rows.append(batch.slice(i, 1).to_pylist()[0])
                except UnicodeDecodeError as e:
                    rows.append(_bad_row(columns, i, PARQUET_FIX, e))
        for rec in rows:
            yield index, f"{path} record {index + 1}", rec
            index += 1


# ----------------------------------------------------------------------------- datasets library


@contextlib.contextmanager
def _forced_offline() -> Iterator[None]:
    # The libraries read HF_HUB_OFFLINE once at import; honour a value set later, too.
    import datasets.config as dconfig  # deferred: the datasets library, only when a download runs
    import huggingface_hub.constants as hconst  # deferred: huggingface_hub, only for a Hub download

    saved = (dconfig.HF_HUB_OFFLINE, dconfig.HF_DATASETS_OFFLINE, hconst.HF_HUB_OFFLINE)
    dconfig.HF_HUB_OFFLINE = dconfig.HF_DATASETS_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconfig.HF_HUB_OFFLINE, dconfig.HF_DATASETS_OFFLINE, hconst.HF_HUB_OFFLINE = saved


def _is_network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    modules = {(c.__module__ or "").split(".")[0] for c in type(e).__mro__}
    return bool(
        isinstance(e, (ConnectionError, TimeoutError, socket.gaierror))
        or names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException"}
        or (modules & {"requests", "httpx", "urllib3"} and "Error" in type(e).__name__)
    )


def offline_message(what: str, sample_name: Optional[str], cause: str, where: str = "the Hugging Face Hub") -> str:
    """The NetworkError text: what failed, and the two ways to go on without the network."""
    sample = f"`gradcouple download {sample_name} --sample` (bundled real sample)" if sample_name else "a bundled sample (`gradcouple download --list`)"
    cached = "" if env_offline() else "; with a copy already in the HF cache, set HF_HUB_OFFLINE=1"
    return (
        f"cannot download {what} from {where}: {cause}. Without network use "
        f"`--from PATH` (a local .json/.jsonl/.parquet file or dataset directory) or {sample}{cached}."
    )


def fetch_file(url: str, *, sample_name: Optional[str] = None, timeout: float = 60.0) -> Path:
    """Download a dataset file published outside the Hub (MQuAKE, RippleEdits on GitHub) into the HF
    datasets cache (``$HF_HOME/datasets/gradcouple-files/``) once, and return its path.

    A cached copy is used as is (also offline); the cache key is the URL, which holds the
    revision.

    Raises:
        NetworkError: offline without a cached copy, host unreachable, or the transfer fails.
        DataError: the server answers that the file does not exist (HTTP 404).
    """
    import datasets.config as dconfig  # deferred: the datasets library, imported only when a download runs

    name = Path(urlparse(url).path).name or "data"
    cached = Path(dconfig.HF_DATASETS_CACHE) / "gradcouple-files" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if cached.is_file():
        return cached
    host = urlparse(url).hostname or url
    if env_offline():
        raise NetworkError(offline_message(repr(url), sample_name, "offline mode (HF_HUB_OFFLINE=1) and no cached copy", host))
    if not reachable(url):
        raise NetworkError(offline_message(repr(url), sample_name, f"{host} is unreachable (no answer within {PROBE_TIMEOUT_S:.0f} s)", host))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_open(cached, "wb") as fh:
            shutil.copyfileobj(resp, fh)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise DataError(f"{url}: not found (HTTP 404); check --revision.") from None
        raise NetworkError(offline_message(repr(url), sample_name, f"HTTP {e.code} {e.reason}", host)) from None
    except (urllib.error.URLError, OSError) as e:
        raise NetworkError(offline_message(repr(url), sample_name, f"transfer failed ({e})", host)) from None
    return cached


def load_records(
    path: str,
    *,
    config: Optional[str] = None,
    split: Optional[str] = None,
    revision: Optional[str] = None,
    data_files: Optional[Mapping[str, str]] = None,
    sample_name: Optional[str] = None,
    split_given: bool = True,
) -> tuple[Iterator[tuple[int, str, Any]], dict]:
    """Load a dataset with the ``datasets`` library, from the Hub or a local dataset directory.

    ``path`` is a Hub id (cached under the normal HF cache; ``HF_HOME`` respected; ``data_files``
    picks files of the repository), a directory written by ``Dataset.save_to_disk``, or a
    directory of data files (``load_dataset(dir)``; a ``config`` subdirectory is used when
    present).
    Returns the records (index, location, record) and a provenance dict.

    Raises:
        NetworkError: offline (HF_HUB_OFFLINE=1 without a cached copy, or the host does not
            answer within a few seconds, or the connection drops).
        DataError: the dataset, config or split does not exist.
    """
    local = Path(path)
    if local.is_dir():
        ds, used_split = _load_local_dir(local, config, split, split_given)
        return _iter_dataset(ds, f"{local} [{used_split}]"), {"split": used_split}

    import datasets  # deferred: the datasets library (pyarrow, ...), only when a download runs

    what = f"{path!r}" + (f" (config {config!r})" if config else "")
    offline = env_offline()
    if not offline:
        import huggingface_hub.constants as hconst  # deferred: huggingface_hub, only for a Hub download

        if not reachable(hconst.ENDPOINT):
            raise NetworkError(offline_message(what, sample_name, f"{urlparse(hconst.ENDPOINT).hostname} is unreachable (no answer within {PROBE_TIMEOUT_S:.0f} s)"))
    kwargs: dict[str, Any] = {"split": split, "revision": revision}
    if config:
        kwargs["name"] = config
    if data_files:
        kwargs["data_files"] = dict(data_files)
    try:
        with _forced_offline() if offline else contextlib.nullcontext():
            ds = datasets.load_dataset(path, **kwargs)
    except Exception as e:
        if _is_network_error(e):
            cause = "offline mode (HF_HUB_OFFLINE=1) and no cached copy" if offline else f"connection failed ({type(e).__name__}: {e})"
            raise NetworkError(offline_message(what, sample_name, cause)) from None
        if type(e).__name__ in {"DatasetNotFoundError", "FileNotFoundError", "RepositoryNotFoundError"}:
            raise DataError(f"{what}: not found on the Hub ({e}). Check the name with `gradcouple download --list`; gated datasets need HF_TOKEN.") from None
        if isinstance(e, ValueError):
            raise DataError(f"{what}: {e}. Check --split/--revision (and the config in `gradcouple download --list`).") from None
        raise
    return _iter_dataset(ds, f"{path} [{split}]"), {"hub_id": path, "config": config, "split": split, "revision": revision}


def _load_local_dir(local: Path, config: Optional[str], split: Optional[str], split_given: bool):
    import datasets  # deferred: the datasets library (pyarrow, ...), only when a download runs

    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            dsd = datasets.load_from_disk(str(local))
        else:
            data_dir = config if config and (local / config).is_dir() else None
            dsd = datasets.load_dataset(str(local), data_dir=data_dir)
    except Exception as e:
        raise DataError(f"{local}: not a readable dataset directory ({type(e).__name__}: {e}). Use a `save_to_disk` directory or a directory of .parquet/.jsonl/.json files.") from None
    if isinstance(dsd, datasets.Dataset):
        return dsd, split or "train"
    names = list(dsd.keys())
    if split in dsd:
        return dsd[split], split
    if not split_given and len(names) == 1:
        return dsd[names[0]], names[0]
    raise DataError(f"{local}: no split {split!r}; it has {', '.join(names) or 'none'}. Pass --split NAME.")


def _iter_dataset(ds: Any, label: str) -> Iterator[tuple[int, str, Any]]:
    i = 0
    rows = iter(ds)
    while True:
        try:
            rec = next(rows)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            # The datasets library does not check that strings are UTF-8; the failed iterator
            # cannot go on, so the rest is read from a new one.
            columns = {} if getattr(ds, "_indices", None) is not None else {name: ds.data.column(name) for name in ds.column_names}
            rec = _bad_row(columns, i, "re-encode the dataset's files as UTF-8 (e.g. iconv -f latin1 -t utf-8)", e)
            rows = iter(ds.select(range(i + 1, len(ds))) if i + 1 < len(ds) else ())
        yield i, f"{label} record {i + 1}", rec
        i += 1
