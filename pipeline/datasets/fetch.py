"""The real data the tests and benchmarks read, fetched onto a machine that has no `../shared/data`.

`data_files.json` beside this module lists every file of the data folder: its path in the folder, its size,
its sha256 and the public URL it was copied from unchanged (a repository at a fixed commit, as the data
folder's README.md names it). `fetch` downloads each file, or copies it from a folder that already holds
the data, checks its sha256 and only then gives it its final name, so an interrupted or refused file never
looks fetched. A second run checks what is there and fetches only what is missing or differs.

    python -m pipeline.datasets fetch                      # every file into .data/ in the project
    python -m pipeline.datasets fetch trec-dl noveleval --to /data/rerank
    python -m pipeline.datasets fetch --from /mnt/shared/data
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import InfrastructureError, InputError

MANIFEST = Path(__file__).with_name("data_files.json")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = PROJECT_ROOT / ".data"
FETCH_COMMAND = "python -m pipeline.datasets fetch"
SHARED_DATA_ENV = "SHARED_DATA"

_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class DataFile:
    path: str  # inside the data folder, "/"-separated, e.g. "trec-dl/qrels.dl19-passage.txt"
    bytes: int
    sha256: str  # hex digest of the whole file
    url: (
        str | None
    )  # where it was copied from; None: no public source, only a copy (--from) brings it

    @property
    def folder(self) -> str:
        """The top-level entry holding the file: its collection folder, or the file itself (README.md)."""
        return self.path.split("/", 1)[0]


def data_files(manifest: str | os.PathLike = MANIFEST) -> list[DataFile]:
    """Every file of the data folder, as `data_files.json` records it, in path order."""
    with open(manifest) as f:
        return sorted((DataFile(**entry) for entry in json.load(f)["files"]), key=lambda f: f.path)


def folders(files: Iterable[DataFile] | None = None) -> list[str]:
    """The data folder's top-level entries (collection folders and README.md), sorted."""
    return sorted({f.folder for f in (data_files() if files is None else files)})


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def locate(environ: Mapping[str, str] = os.environ, root: Path = PROJECT_ROOT) -> Path:
    """The real data folder: `$SHARED_DATA` if set, else `../shared/data` beside the project, else the fetch
    command's default `.data/` in the project; checked to hold every file that has a public source (sizes only,
    so a half-finished fetch is named before any test reads it)."""
    if environ.get(SHARED_DATA_ENV):
        candidates = [Path(environ[SHARED_DATA_ENV])]
        where = f"${SHARED_DATA_ENV} ({candidates[0]})"
    else:
        candidates = [root.parent / "shared" / "data", root / ".data"]
        where = f"{candidates[0]} or {candidates[1]}"
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise InputError(
            f"real data missing: run `{FETCH_COMMAND}` (downloads {_megabytes(data_files())} MB into "
            f"{root / '.data'}), or set {SHARED_DATA_ENV} to a folder holding it; looked in {where}"
        )
    wrong = [
        f.path
        for f in data_files()
        if f.url is not None
        and (not (folder / f.path).is_file() or (folder / f.path).stat().st_size != f.bytes)
    ]
    if wrong:
        fix = f"{FETCH_COMMAND}" + ("" if folder == root / ".data" else f" --to {folder}")
        raise InputError(
            f"real data incomplete: run `{fix}` to complete it; {folder} lacks {len(wrong)} file(s) "
            f"or holds them with other sizes ({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''})"
        )
    return folder


def _megabytes(files: Iterable[DataFile]) -> int:
    return round(sum(f.bytes for f in files if f.url is not None) / 1e6)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch(
    to: str | os.PathLike = DEFAULT_DIR,
    names: Sequence[str] = (),
    *,
    source_dir: str | os.PathLike | None = None,
    mirror: str | None = None,
    say: Callable[[str], None] = _say,
) -> dict:
    """Put every file of `names` (top-level entries of the data folder; all when empty) under `to`, verified.

    Each file comes from `source_dir` when it holds it, else from `mirror`/<path> when given (a copy of the whole
    data folder), else from its public URL. Returns counts: {"to", "files", "downloaded", "copied", "already_there", "bytes", "no_source"}.
    Raises InputError (a copy in `source_dir` is not the recorded file) or InfrastructureError (a download
    failed or arrived different); files finished before the failure stay, so a rerun goes on from there."""
    files = data_files()
    unknown = sorted(set(names) - set(folders(files)))
    if unknown:
        raise InputError(
            f"the data folder has no {', '.join(unknown)}; it holds: {', '.join(folders(files))}"
        )
    if names:
        files = [f for f in files if f.folder in names]
    to = Path(to)
    source = Path(source_dir) if source_dir is not None else None
    if source is not None and not source.is_dir():
        raise InputError(
            f"--from {source} is not a folder: pass the folder holding the data (the one with trec-dl/ "
            "and the other collections in it)"
        )
    if source is not None and to.exists() and source.resolve() == to.resolve():
        source = None  # the destination itself: what is there is checked below, what is missing is downloaded
    counts = {
        "to": str(to),
        "files": len(files),
        "downloaded": 0,
        "copied": 0,
        "already_there": 0,
        "bytes": 0,
        "no_source": [],
    }
    for f in files:
        target = to / f.path
        if target.is_file():
            if target.stat().st_size == f.bytes and sha256_of(target) == f.sha256:
                counts["already_there"] += 1
                continue
            target.unlink()  # known wrong: it must not pass for fetched if the new copy is refused too
            say(
                f"{f.path}: the copy in {to} differs from the recorded file: removed, fetching it again"
            )
        url = f"{mirror.rstrip('/')}/{f.path}" if mirror else f.url
        if source is not None and (source / f.path).is_file():
            _copy(f, source / f.path, target)
            counts["copied"] += 1
            say(f"copied {f.path} from {source}")
        elif url is None:
            counts["no_source"].append(f.path)
            say(
                f"{f.path}: no public source (written for this project, not downloadable): skipped; copy it from a "
                f"machine that has the data with `{FETCH_COMMAND} --from DIR`"
            )
            continue
        else:
            _download(f, url, target)
            counts["downloaded"] += 1
            say(f"downloaded {f.path} ({f.bytes / 1e6:.1f} MB) from {url}")
        counts["bytes"] += f.bytes
    return counts


def _copy(f: DataFile, source: Path, target: Path) -> None:
    with open(source, "rb") as reader:
        got = _write_verified(f, reader, target)
    if got != f.sha256:
        raise InputError(
            f"{source} is not the recorded {f.path} (sha256 {got[:12]}..., expected {f.sha256[:12]}...); "
            f"nothing was written to {target}: replace it with the original, or download it instead "
            f"(no --from, ${SHARED_DATA_ENV} unset)"
        )


def _download(f: DataFile, url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            got = _write_verified(f, response, target)
    except (
        urllib.error.URLError,
        http.client.HTTPException,
        ssl.SSLError,
        TimeoutError,
        ConnectionError,
    ) as e:
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise InfrastructureError(
            f"cannot download {f.path} from {url} ({reason}); check the network and rerun the "
            "same command (files already fetched are kept), or copy the data from a machine "
            f"that has it with `{FETCH_COMMAND} --from DIR`"
        ) from e
    if got != f.sha256:
        raise InfrastructureError(
            f"{url} sent a different {f.path} (sha256 {got[:12]}..., expected "
            f"{f.sha256[:12]}...); nothing was written to {target}: rerun the same command, and "
            "if it is refused again the source has changed: copy the data from a machine that has "
            f"it with `{FETCH_COMMAND} --from DIR`"
        )


def _write_verified(f: DataFile, reader, target: Path) -> str:
    """Stream `reader` into a temporary file beside `target`; rename it to `target` only if its sha256 is the
    recorded one, delete it otherwise. Returns the sha256 of what was read."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".partial"
    )
    try:
        digest = hashlib.sha256()
        with os.fdopen(descriptor, "wb") as out:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() == f.sha256:
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        return digest.hexdigest()
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
