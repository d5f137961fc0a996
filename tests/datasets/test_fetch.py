"""`python -m pipeline.datasets fetch` on a machine without the shared data: a copy of a few real files served by
an HTTP server on loopback stands in for the public sources (`--mirror`). What is proved: the download path, the
sha256 check (a corrupted file is refused by name and never takes its final name), a rerun that fetches nothing
twice and completes a refused or damaged fetch, `--from`, and where the tests look for the data."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest

from pipeline.core.errors import InputError
from pipeline.datasets.__main__ import main
from pipeline.datasets.fetch import data_files, locate

NOVELEVAL = [
    "noveleval/corpus.tsv",
    "noveleval/qrels.txt",
    "noveleval/queries.tsv",
]  # 392 KB, path order


@pytest.fixture(autouse=True)
def _no_shared_data_env(monkeypatch):
    # $SHARED_DATA is the command's default --from: these tests choose their source themselves.
    monkeypatch.delenv("SHARED_DATA", raising=False)


@contextlib.contextmanager
def _serve(directory: Path):
    """An HTTP server on 127.0.0.1 (a free port) serving `directory`: (base URL, the paths it was asked for)."""
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", asked
    finally:
        server.shutdown()
        server.server_close()


def _copy(shared_data: Path, to: Path, paths: list[str]) -> Path:
    for path in paths:
        (to / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / path, to / path)
    return to


def _corrupt(path: Path) -> None:
    """Change a byte in the middle, keeping the size: only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _error_line(stderr: str) -> str:
    """The command's one `error:` line, after checking it is the only one and that no traceback came with it."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_the_recorded_checksums_and_sources_are_those_of_the_data(shared_data):
    files = data_files()
    assert [f.path for f in files if f.url is None] == [
        "README.md"
    ]  # written for the project, no public source
    assert {f.path for f in files if f.url} == set(_files(shared_data)) - {"README.md"}
    for f in files:
        if f.url:
            data = (shared_data / f.path).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (f.bytes, f.sha256), f.path
            # a file of a public repository at a fixed commit, so what it serves cannot drift
            assert re.fullmatch(
                r"https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/\S+", f.url
            ), f.url


def test_download_checks_every_file_and_a_rerun_fetches_only_what_differs(
    shared_data, tmp_path, run_entry_point
):
    to = tmp_path / "data"
    with _serve(_copy(shared_data, tmp_path / "www", NOVELEVAL)) as (url, asked):
        first = run_entry_point(main, "fetch", "noveleval", "--to", to, "--mirror", url)
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout) | {"to": None} == {
            "to": None,
            "files": 3,
            "downloaded": 3,
            "copied": 0,
            "already_there": 0,
            "bytes": sum((shared_data / p).stat().st_size for p in NOVELEVAL),
            "no_source": [],
        }
        assert _files(to) == NOVELEVAL  # no temporary file left beside them
        assert all((to / p).read_bytes() == (shared_data / p).read_bytes() for p in NOVELEVAL)
        assert asked == [f"/{p}" for p in NOVELEVAL]

        again = run_entry_point(main, "fetch", "noveleval", "--to", to, "--mirror", url)
        assert again.returncode == 0, again.stderr
        assert (
            json.loads(again.stdout)["already_there"] == 3 and len(asked) == 3
        )  # checked, nothing downloaded

        _corrupt(to / "noveleval/qrels.txt")
        repaired = run_entry_point(main, "fetch", "noveleval", "--to", to, "--mirror", url)
        assert repaired.returncode == 0, repaired.stderr
        assert (
            "noveleval/qrels.txt: the copy in" in repaired.stderr
            and "removed, fetching it again" in repaired.stderr
        )
        assert json.loads(repaired.stdout)["downloaded"] == 1 and asked[3:] == [
            "/noveleval/qrels.txt"
        ]
        assert (to / "noveleval/qrels.txt").read_bytes() == (
            shared_data / "noveleval/qrels.txt"
        ).read_bytes()


def test_a_corrupted_download_is_refused_by_name_and_a_rerun_completes(
    shared_data, tmp_path, run_entry_point
):
    www = _copy(shared_data, tmp_path / "www", NOVELEVAL)
    _corrupt(www / "noveleval/qrels.txt")
    to = tmp_path / "data"
    (to / "noveleval").mkdir(parents=True)
    (to / "noveleval/qrels.txt").write_text("left by an older, damaged fetch\n")
    with _serve(www) as (url, _):
        refused = run_entry_point(main, "fetch", "noveleval", "--to", to, "--mirror", url)
        assert refused.returncode == 3
        error = _error_line(refused.stderr)
        assert (
            f"{url}/noveleval/qrels.txt sent a different noveleval/qrels.txt" in error
            and "--from DIR" in error
        )
        # the file before it is kept; under the refused name nothing, not even the damaged copy that was there
        assert _files(to) == ["noveleval/corpus.tsv"]

        shutil.copyfile(shared_data / "noveleval/qrels.txt", www / "noveleval/qrels.txt")
        rerun = run_entry_point(main, "fetch", "noveleval", "--to", to, "--mirror", url)
        assert rerun.returncode == 0, rerun.stderr
        summary = json.loads(rerun.stdout)
        assert (summary["already_there"], summary["downloaded"]) == (1, 2) and _files(
            to
        ) == NOVELEVAL


def test_an_unreachable_source_names_the_file_and_what_to_do(tmp_path, run_entry_point):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_entry_point(
        main,
        "fetch",
        "noveleval",
        "--to",
        tmp_path / "data",
        "--mirror",
        f"http://127.0.0.1:{port}",
    )
    assert result.returncode == 3
    error = _error_line(result.stderr)
    assert error.startswith(
        f"error: cannot download noveleval/corpus.tsv from http://127.0.0.1:{port}/noveleval/"
    )
    assert "rerun the same command" in error and "--from DIR" in error
    assert _files(tmp_path / "data") == []


def test_from_copies_verified_files_and_refuses_a_different_copy(
    shared_data, tmp_path, run_entry_point
):
    copied = run_entry_point(
        main, "fetch", "noveleval", "--to", tmp_path / "a", "--from", shared_data
    )
    assert copied.returncode == 0, copied.stderr
    assert json.loads(copied.stdout)["copied"] == 3
    assert all(
        (tmp_path / "a" / p).read_bytes() == (shared_data / p).read_bytes() for p in NOVELEVAL
    )

    source = _copy(shared_data, tmp_path / "src", NOVELEVAL)
    _corrupt(source / "noveleval/queries.tsv")
    refused = run_entry_point(main, "fetch", "noveleval", "--to", tmp_path / "b", "--from", source)
    assert refused.returncode == 2
    assert _error_line(refused.stderr).startswith(
        f"error: {source}/noveleval/queries.tsv is not the recorded"
    )
    assert _files(tmp_path / "b") == NOVELEVAL[:2]


def test_a_file_without_public_source_is_named_and_skipped(tmp_path, run_entry_point):
    result = run_entry_point(
        main, "fetch", "README.md", "--to", tmp_path / "data"
    )  # no network needed
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["no_source"] == ["README.md"]
    assert "README.md: no public source" in result.stderr and "--from DIR" in result.stderr
    assert not (tmp_path / "data" / "README.md").exists()


def test_the_tests_look_in_shared_data_then_beside_the_project_then_where_fetch_puts_it(
    shared_data, tmp_path
):
    root = tmp_path / "project"
    root.mkdir()
    with pytest.raises(
        InputError, match=r"^real data missing: run `python -m pipeline\.datasets fetch` "
    ):
        locate({}, root)
    fetched = root / ".data"
    required = [f.path for f in data_files() if f.url]
    for path in required[:-1]:  # a fetch stopped before its last file
        (fetched / path).parent.mkdir(parents=True, exist_ok=True)
        (fetched / path).symlink_to(shared_data / path)
    with pytest.raises(
        InputError,
        match=r"^real data incomplete: run `python -m pipeline\.datasets fetch` to "
        rf"complete it; {fetched} lacks 1 file\(s\)",
    ):
        locate({}, root)
    (fetched / required[-1]).symlink_to(shared_data / required[-1])
    assert locate({}, root) == fetched

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)
    assert locate({}, root) == tmp_path / "shared" / "data"
    assert locate({"SHARED_DATA": str(fetched)}, root) == fetched
    with pytest.raises(InputError, match=r"looked in \$SHARED_DATA"):
        locate({"SHARED_DATA": str(tmp_path / "elsewhere")}, root)
