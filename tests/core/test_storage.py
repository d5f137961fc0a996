"""`create_exclusive`: one writer wins, and the file is never seen empty or half written."""

from __future__ import annotations

import threading

import fsspec

from pipeline.core.storage import create_exclusive


def test_one_writer_wins_and_leaves_no_temporary_file(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "_lease.json")
    assert create_exclusive(fs, path, b'{"owner": "first"}')
    assert not create_exclusive(fs, path, b'{"owner": "second"}')
    assert (tmp_path / "_lease.json").read_bytes() == b'{"owner": "first"}'
    assert [p.name for p in tmp_path.iterdir()] == ["_lease.json"]


def test_racing_writers_one_wins_and_readers_only_ever_see_whole_files(tmp_path):
    fs = fsspec.filesystem("file")
    path = tmp_path / "_lease.json"
    payloads = [(f'{{"owner": {i}, "pad": "' + "x" * 20_000_000 + '"}').encode() for i in range(8)]
    seen: set[int] = set()
    stop = threading.Event()

    def read_while_racing():
        while not stop.is_set():
            try:
                seen.add(len(path.read_bytes()))
            except FileNotFoundError:
                pass

    won = []
    reader = threading.Thread(target=read_while_racing)
    reader.start()
    writers = [
        threading.Thread(
            target=lambda d=d: won.append(d) if create_exclusive(fs, str(path), d) else None
        )
        for d in payloads
    ]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert len(won) == 1 and path.read_bytes() == won[0]
    assert seen <= {len(won[0])}  # never an empty or partial lease
    assert [p.name for p in tmp_path.iterdir()] == ["_lease.json"]
