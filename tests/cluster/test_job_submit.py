"""The README's cluster commands as written: a real `ray start --head`, a real `ray job submit --working-dir .`.

They run on two kinds of machine, because Ray (>= 2.52) decides on token authentication by what it finds there:
a fresh machine, and one that already holds `~/.ray/auth_token` (any local `ray.init()` writes one), where a
plain `ray start` turns token authentication on and a plain `ray job submit` is then refused. Each machine is a
private HOME; the head listens on loopback only, on free ports, in a private temp dir, and the test ends exactly
the processes it started.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"

# Every port `ray start --head` opens at a fixed number unless told otherwise (the dashboard agent's 52365 and
# the Ray client server's 10001 would collide with any other head on this machine); the README's command
# names --port and --dashboard-port itself. Worker ports come from the OS (`--min/max-worker-port 0`).
README_PORTS = ("--port", "--dashboard-port")
OTHER_PORTS = (
    "--node-manager-port",
    "--object-manager-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)


def readme_cluster_commands() -> list[str]:
    """The command lines of the bash block in the README's "On a cluster" paragraph, continuations joined."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"\*\*On a cluster\.\*\*(.*?)(?:\n## |$)", readme, flags=re.S)
    block = section and re.search(r"```bash\n(.*?)```", section.group(1), flags=re.S)
    assert block, "README: the 'On a cluster' paragraph has no ```bash block of commands"
    commands = [
        shlex.split(line, comments=True)
        for line in block.group(1).replace("\\\n", " ").splitlines()
    ]
    return [
        " ".join(tokens) for tokens in commands if tokens
    ]  # not shlex.join: it would quote a `>`


def _one(commands: list[str], prefix: str) -> str:
    found = [c for c in commands if c.startswith(prefix)]
    assert len(found) == 1, (
        f"README: expected one `{prefix} ...` command in 'On a cluster', found {found}"
    )
    return found[0]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))  # all held at once, so the n ports differ
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _set_flag(tokens: list[str], flag: str, value) -> None:
    assert flag in tokens, f"README: `{' '.join(tokens[:3])}` has no {flag}"
    tokens[tokens.index(flag) + 1] = str(value)


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line) of every live process, from /proc (zombies left out)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid, _, session = (
                    f.read().rpartition(")")[2].split()[:4]
                )  # the name before ")" may hold spaces
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if state != "Z":
            found[int(entry)] = (int(ppid), int(session), cmdline)
    return found


def _ours(session: int, markers: tuple[str, ...]) -> dict[int, str]:
    """Processes of the session `ray start` ran in, and any whose command line names our private paths (the
    job's driver, which the job supervisor starts in a session of its own): pid -> command line."""
    procs = _processes()
    mine, pid = set(), os.getpid()
    while (
        pid in procs and pid not in mine
    ):  # this test and its ancestors, whatever their command lines say
        mine.add(pid)
        pid = procs[pid][0]
    return {
        pid: cmdline
        for pid, (_, sid, cmdline) in procs.items()
        if pid not in mine and (sid == session or any(m in cmdline for m in markers))
    }


def _signal_and_wait(pids, signum: int, timeout: float) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and set(pids) & set(_processes()):
        time.sleep(0.2)


def _stop(session: int, markers: tuple[str, ...]) -> None:
    # Not `ray stop` (the README's clean-up on a cluster node): it ends every Ray process on the machine, other
    # users' and other tests' included. A head's processes all stay in the session of the `ray start` that
    # made them (Ray never calls setsid for them), so that session is exactly our cluster.
    _signal_and_wait(list(_ours(session, markers)), signal.SIGTERM, timeout=5)
    # the GCS server can outlive SIGTERM by more than 10 s once its raylet is gone; the cluster is thrown away
    _signal_and_wait(list(_ours(session, markers)), signal.SIGKILL, timeout=10)
    left = [f"{pid} {cmdline[:150]}" for pid, cmdline in _ours(session, markers).items()]
    assert not left, (
        "processes of the test's Ray head (gcs_server, raylet...) are still running:\n"
        + "\n".join(left)
    )


@dataclass
class Head:
    env: dict
    dashboard: str  # http://127.0.0.1:PORT
    token_file: Path  # the machine's ~/.ray/auth_token
    token_before: str | None


@pytest.fixture(params=["fresh-machine", "machine-with-a-token"])
def head(request, tmp_path):
    """A head node started by the README's commands on a machine of the given kind; stopped, whatever happens."""
    commands = readme_cluster_commands()
    home = tmp_path / "home"
    token_file = home / ".ray" / "auth_token"
    token_file.parent.mkdir(parents=True)
    if request.param == "machine-with-a-token":
        token_file.write_text(secrets.token_hex(32))  # what a local `ray.init()` leaves behind
    token_before = token_file.read_text() if token_file.exists() else None

    cache = os.environ.get("RERANK_CACHE", str(Path.home() / ".cache" / "rerank-pipeline"))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("RAY_")
    }  # no RAY_ADDRESS, RAY_AUTH_* of ours
    env.update(
        HOME=str(home),
        PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}",
        RERANK_CACHE=cache,  # the dummy checkpoint already built, rather than a rebuild in the new HOME
        # keeps the node on 127.0.0.1: on Linux, Ray otherwise swaps a loopback --node-ip-address for the
        # machine's address and its servers listen there
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
    )
    for line in commands:
        if line.startswith("export "):
            for assignment in line.split()[1:]:
                name, _, value = assignment.partition("=")
                env[name] = value

    generate = _one(commands, "ray get-auth-token")
    result = subprocess.run(
        generate,
        shell=True,
        executable="/bin/bash",
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    with _head_started(_one(commands, "ray start --head"), env, tmp_path) as dashboard_port:
        yield Head(env, f"http://127.0.0.1:{dashboard_port}", token_file, token_before)


@contextmanager
def _head_started(start_line: str, env: dict, tmp_path: Path):
    """Runs the README's `ray start --head` line on free loopback ports and a private temp dir; yields the
    dashboard's port and stops every process of that head at exit, whatever happened."""
    for attempt in (1, 2):
        # Short: Ray's unix sockets live under it, and a socket path may not exceed 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        ports = dict(zip(README_PORTS + OTHER_PORTS, _free_ports(len(README_PORTS + OTHER_PORTS))))
        argv = shlex.split(start_line)
        for flag in README_PORTS:
            _set_flag(argv, flag, ports[flag])
        _set_flag(argv, "--dashboard-host", "127.0.0.1")
        argv += [a for flag in OTHER_PORTS for a in (flag, str(ports[flag]))]
        argv += [
            "--node-ip-address",
            "127.0.0.1",
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
            "--temp-dir",
            temp_dir,
            "--num-cpus",
            "2",
            "--disable-usage-stats",
        ]
        starter = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = starter.communicate(timeout=300)
            # The raylet gives the dashboard agent a fixed 15 s to write its ports and exits if it is late
            # (ray-project/ray#65983): Ray's start-up losing to a machine loaded many times over, not the
            # README's commands. One more try, on new ports, once this one's processes are gone.
            if (
                starter.returncode != 0
                and attempt == 1
                and any(
                    "Timed out waiting for file" in log.read_text(errors="replace")
                    for log in Path(temp_dir).glob("session_*/logs/raylet.out")
                )
            ):
                continue
            assert starter.returncode == 0, output[-3000:]
            yield ports["--dashboard-port"]
            return
        finally:
            if starter.poll() is None:
                starter.kill()
            try:
                _stop(starter.pid, (temp_dir, str(tmp_path)))
            finally:
                shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def dl19_pairs(shared_data, tmp_path) -> tuple[Path, list[tuple]]:
    """200 DL19 pairs (two queries' BM25 top-100) and one repeated pair, which the job must reject."""
    with open(shared_data / "trec-dl" / "retrieve_results_dl19.json") as f:
        topics = json.load(f)
    rows = [
        dict(query_id=h["qid"], query=t["query"], doc_id=h["docid"], document=h["content"])
        for t in topics
        for h in t["hits"]
    ][:200]
    rows.append(dict(rows[7]))
    path = tmp_path / "in" / "dl19-200.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, [(r["query_id"], r["doc_id"]) for r in rows]


def _status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _read(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    assert files, f"no Parquet files in {folder}"
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


@pytest.mark.slow
def test_the_readme_cluster_commands_run_the_rerank_job(head, dl19_pairs, tmp_path):
    token = head.token_file.read_text()
    if head.token_before is None:
        assert token, (
            "the README's `ray get-auth-token --generate` wrote no token on a fresh machine"
        )
    else:
        assert token == head.token_before, (
            "the README's commands replaced the machine's existing token"
        )
    # The head asks for that token: a cluster anyone on the network could run code on is not what we document.
    assert _status(f"{head.dashboard}/api/jobs/") == 401
    assert _status(f"{head.dashboard}/api/jobs/", token) == 200

    input_path, input_keys = dl19_pairs
    output = tmp_path / "out"
    submit = shlex.split(_one(readme_cluster_commands(), "ray job submit"))
    prefix = submit[: submit.index("--")]
    assert submit[len(prefix) + 1 : len(prefix) + 4] == ["python", "-m", "jobs.rerank"]
    _set_flag(prefix, "--address", head.dashboard)
    argv = prefix + [
        "--",
        "python",
        "-m",
        "jobs.rerank",
        "--input",
        str(input_path),
        "--output",
        str(output),
        "--model",
        "dummy:tiny",
    ]
    result = subprocess.run(
        argv, cwd=ROOT, env=head.env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", result.stdout), result.stdout[-2000:]

    summary = json.loads((output / "summary.json").read_text())
    assert summary["input_rows"] == len(input_keys) == 201
    assert summary["input_rows"] == summary["scored_rows"] + summary["rejected_rows"]
    assert (summary["scored_rows"], summary["rejected_rows"], summary["random_weights"]) == (
        200,
        1,
        True,
    )
    ranked = _read(output / "ranked")
    ranked_keys = list(
        zip(ranked.column("query_id").to_pylist(), ranked.column("doc_id").to_pylist())
    )
    assert Counter(ranked_keys) == Counter(set(input_keys))  # every input pair, exactly once
    rejected = _read(output / "rejected")
    assert list(
        zip(rejected.column("query_id").to_pylist(), rejected.column("doc_id").to_pylist())
    ) == [input_keys[7]]
    for query_id in set(ranked.column("query_id").to_pylist()):
        ranks = [
            r
            for q, r in zip(
                ranked.column("query_id").to_pylist(), ranked.column("rank").to_pylist()
            )
            if q == query_id
        ]
        assert sorted(ranks) == list(range(1, 101))
