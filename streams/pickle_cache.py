"""Feature pickles converted once, in a sandboxed child process, into plain ``.npz`` arrays.

Defence in depth around ``streams.safe_pickle``: even if a file found a flaw in the reader, the
flaw would play out in a child process that has a CPU-time and an address-space limit, and that
only writes arrays. The parent turns the child's crash, timeout or memory exhaustion into a
one-line ``DataError`` naming the file. Later runs read only the cache, with
``np.load(allow_pickle=False)``: nothing in it can run code or build objects.

The cache entry of a file is ``<cache>/<file stem>-<key>/`` with ``arrays.npz`` and
``dataset.json``; the key covers the file's path, size and modification time, the stream, and
``CACHE_FORMAT``, so a changed file or a changed converter is converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cmmm.atomic_files import current_umask
from cmmm.data.dataset import MultimodalDataset, Split
from cmmm.errors import DataError, one_line

Log = Callable[[str], object]

CACHE_FORMAT = 1
ARRAYS_FILE = "arrays.npz"
META_FILE = "dataset.json"
# The child's budget: CPU seconds and bytes of address space beyond what it has after its
# imports, both growing with the file (reading is linear in its size).
CPU_SECONDS_BASE = 120
CPU_SECONDS_PER_GB = 120
MEMORY_BASE = 2 * 2**30
MEMORY_PER_FILE_BYTE = 6
# Exit codes the child uses to say what happened (anything else is a crash).
EXIT_DATA_ERROR = 3
EXIT_OUT_OF_MEMORY = 4
_LOG_PREFIX = "log: "
# The module whose ``python -m`` is the conversion child: the loader runs ``conversion_child``
# with itself, so the cache never imports the loader (the loader imports the cache).
CONVERTER_MODULE = "streams.pickles"


def cache_entry(path: Path, stream: str, cache_dir: Path) -> Path:
    """Where ``path``'s conversion for ``stream`` is kept."""
    status = path.stat()
    material = json.dumps(
        [CACHE_FORMAT, str(path.resolve()), status.st_size, status.st_mtime_ns, stream]
    )
    key = hashlib.sha256(material.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{path.stem}-{key}"


def cached_pickle_dataset(
    path: Path, stream: str, cache_dir: Path, log: Log = print
) -> MultimodalDataset:
    """The dataset of the pickle ``path``, converted in a sandbox on first use."""
    path = Path(path)
    try:
        entry = cache_entry(path, stream, cache_dir)
    except OSError as error:
        raise DataError(f"cannot read {path}: {one_line(error.strerror or error)}") from None
    if not (entry / META_FILE).is_file():
        convert_in_child(path, stream, entry, log)
    try:
        return read_cache(entry)
    except DataError as error:
        # A cache entry is ours and can be rebuilt: a damaged one is converted again, once.
        log(f"{entry}: {error}; converting {path} again")
        shutil.rmtree(entry, ignore_errors=True)
        convert_in_child(path, stream, entry, log)
        return read_cache(entry)


def child_limits(file_size: int) -> tuple[int, int]:
    """(CPU seconds, bytes of address space) the child may use beyond its start-up."""
    gigabytes = file_size / 2**30
    return (
        int(CPU_SECONDS_BASE + CPU_SECONDS_PER_GB * gigabytes),
        MEMORY_BASE + MEMORY_PER_FILE_BYTE * file_size,
    )


def convert_in_child(
    path: Path,
    stream: str,
    entry: Path,
    log: Log,
    limits: tuple[int, int] | None = None,
) -> None:
    """Run the conversion of ``path`` into ``entry`` in a child process with resource limits."""
    cpu_seconds, memory = limits or child_limits(path.stat().st_size)
    entry.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        CONVERTER_MODULE,
        str(path),
        stream,
        str(entry),
        str(cpu_seconds),
        str(memory),
    ]
    # The child imports this very code, wherever it was imported from here.
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    log(f"{path}: converting to plain arrays in {entry} (once; in a sandboxed process)")
    try:
        finished = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=environment,
            # Wall time: the CPU limit plus start-up and disk waits.
            timeout=2 * cpu_seconds + 60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DataError(
            f"{path}: converting it took longer than {2 * cpu_seconds + 60} s and was stopped; "
            "the file is far larger than a feature pickle or hostile"
        ) from None
    for line in finished.stdout.splitlines():
        if line.startswith(_LOG_PREFIX):
            log(line[len(_LOG_PREFIX) :])
    if finished.returncode == 0 and (entry / META_FILE).is_file():
        return
    last_line = next((line for line in reversed(finished.stderr.splitlines()) if line.strip()), "")
    raise DataError(_failure_message(path, finished.returncode, last_line, cpu_seconds, memory))


def _failure_message(path: Path, code: int, last_line: str, cpu_seconds: int, memory: int) -> str:
    if code == EXIT_DATA_ERROR and last_line:
        return one_line(last_line)  # the child's DataError, which names the file
    if code == EXIT_OUT_OF_MEMORY:
        return (
            f"{path}: reading it needed more than {memory // 2**20} MB of memory and was "
            "stopped; the file is damaged or hostile"
        )
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return (
            f"{path}: reading it took more than {cpu_seconds} s of CPU time and was stopped; "
            "the file is damaged or hostile"
        )
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
        return (
            f"{path}: the process reading it crashed (signal {name}); the file is damaged or "
            "hostile, do not load it with plain pickle"
        )
    detail = f": {one_line(last_line)[:200]}" if last_line else ""
    return f"{path}: the process converting it failed with exit code {code}{detail}"


# --------------------------------------------------------------------------------------------
# The cache's format: arrays in one .npz, everything else in JSON


def write_cache(dataset: MultimodalDataset, entry: Path) -> None:
    """Write ``dataset`` to ``entry`` (created whole or not at all)."""
    arrays: dict[str, np.ndarray] = {}
    splits: dict[str, Any] = {}
    for split_name, split in dataset.splits.items():
        for modality, array in split.features.items():
            arrays[f"{split_name}/features/{modality}"] = array
        arrays[f"{split_name}/labels"] = split.labels
        if split.groups is not None:
            arrays[f"{split_name}/groups"] = np.asarray(split.groups, dtype=str)
        for modality, lengths in split.lengths.items():
            arrays[f"{split_name}/lengths/{modality}"] = lengths
        splits[split_name] = {
            "modalities": list(split.features),
            "groups": split.groups is not None,
            "lengths": list(split.lengths),
        }
    meta = {
        "format": CACHE_FORMAT,
        "name": dataset.name,
        "modalities": list(dataset.modalities),
        "task_type": dataset.task_type,
        "metric_family": dataset.metric_family,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "source": dataset.source,
        "notes": json.loads(json.dumps(dataset.notes, default=str)),
        "splits": splits,
    }
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    try:
        with open(staging / ARRAYS_FILE, "wb") as handle:
            np.savez(handle, **arrays)
        (staging / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        os.chmod(staging, 0o777 & ~current_umask())
        os.replace(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_cache(entry: Path) -> MultimodalDataset:
    """The dataset stored in ``entry``; a damaged entry is a ``DataError``."""
    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise DataError(f"{entry / META_FILE}: not a cache entry of this version of cmmm")
        with np.load(entry / ARRAYS_FILE, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        splits = {}
        for split_name, layout in meta["splits"].items():
            splits[split_name] = Split(
                features={m: arrays[f"{split_name}/features/{m}"] for m in layout["modalities"]},
                labels=arrays[f"{split_name}/labels"],
                groups=arrays[f"{split_name}/groups"] if layout["groups"] else None,
                lengths={m: arrays[f"{split_name}/lengths/{m}"] for m in layout["lengths"]},
            )
        dataset = MultimodalDataset(
            name=meta["name"],
            modalities=tuple(meta["modalities"]),
            task_type=meta["task_type"],
            metric_family=meta["metric_family"],
            train=splits["train"],
            valid=splits["valid"],
            test=splits["test"],
            num_classes=int(meta["num_classes"]),
            class_names=tuple(meta["class_names"]),
            source=meta["source"],
            notes=meta["notes"],
        )
        dataset.validate()
        return dataset
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DataError(
            f"{entry}: damaged cache entry ({type(error).__name__}: {one_line(error)[:160]})"
        ) from None


# --------------------------------------------------------------------------------------------
# The child


def _limit(kind: int, extra: int) -> None:
    """Allow ``extra`` more of ``kind`` than is used now (CPU seconds, or address space)."""
    if kind == resource.RLIMIT_CPU:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = int(usage.ru_utime + usage.ru_stime) + 1
    else:
        used = _address_space()
    soft, hard = resource.getrlimit(kind)
    wanted = used + extra
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(kind, (wanted, hard))


def _address_space() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[0]) * resource.getpagesize()
    except OSError:  # not Linux: no good measure; the limit then counts from nothing
        return 0


def conversion_child(
    argv: list[str], load_pickle_file: Callable[[Path, str, Log], MultimodalDataset]
) -> int:
    """The child's whole work: limit itself, load the pickle (``argv``: path, stream, cache
    entry, CPU seconds, bytes of memory) and write its arrays; the exit code says how it went."""
    path, stream, entry, cpu_seconds, memory = argv
    _limit(resource.RLIMIT_CPU, int(cpu_seconds))
    _limit(resource.RLIMIT_AS, int(memory))

    def log(line: str) -> None:
        print(_LOG_PREFIX + one_line(line), flush=True)

    try:
        dataset = load_pickle_file(Path(path), stream, log)
        write_cache(dataset, Path(entry))
    except DataError as error:
        print(one_line(error), file=sys.stderr)
        return EXIT_DATA_ERROR
    except MemoryError:
        return EXIT_OUT_OF_MEMORY
    return 0
