"""Every command of the README, run as written, or checked where it needs what no test machine has.

- The two set-up blocks: the second is CI's command (`.ci/run`); the first installs a subset of it and runs the
  first runs' rerank command with the hub model instead of `dummy:tiny` (no network here).
- The "First runs" block and both Python blocks run here, in one temporary folder, in this process on one local
  Ray (the jobs' own `main` through the shared entry point, as `python -m` runs it).
- The "On a cluster" block: `tests/cluster/test_job_submit.py` runs its head, token and submission commands on a
  real `ray start --head`; the rest is checked against the installed Ray's own command line here.
- ```console blocks need a Docker daemon and a Kubernetes cluster with KubeRay; their files are checked here and
  validated by `tests/cluster/test_manifests.py`.
- ```text blocks are synopses: every flag they show is one the command accepts.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.core.cli import DTYPES, run_main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HUB_MODEL = "jinaai/jina-reranker-v2-base-multilingual"


def _fenced(language: str, text: str | None = None) -> list[str]:
    return re.findall(
        rf"^```{language}\n(.*?)^```", README if text is None else text, flags=re.S | re.M
    )


def _section(title: str) -> str:
    """The README's `## title` section, up to the next `## ` heading."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert found, f"README: no '## {title}' section"
    return found.group(1)


def _commands(block: str) -> list[list[str]]:
    """A shell block's commands as argument lists: continuations joined, comments and blank lines dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [tokens for tokens in (shlex.split(line, comments=True) for line in lines) if tokens]


def _first_runs() -> list[list[str]]:
    blocks = _fenced("bash", _section("First runs"))
    assert len(blocks) == 1, "README: 'First runs' holds one ```bash block"
    return _commands(blocks[0])


def _cluster_block() -> str:
    # The paragraph and the block tests/cluster/test_job_submit.py reads (its readme_cluster_commands()).
    section = re.search(r"\*\*On a cluster\.\*\*(.*?)(?:\n## |$)", README, flags=re.S)
    assert section, "README: no '**On a cluster.**' paragraph"
    return _fenced("bash", section.group(1))[0]


def _main(module: str):
    """The `main` that `python -m module` runs."""
    package = importlib.import_module(module)
    return getattr(package, "main", None) or importlib.import_module(f"{module}.__main__").main


def test_every_bash_block_is_a_setup_a_first_run_or_the_cluster_block():
    # A new ```bash block needs its run here: this names the four the tests below run.
    blocks = [b.strip() for b in _fenced("bash")]
    first_runs = _fenced("bash", _section("First runs"))[0].strip()
    setup = [b.strip() for b in _fenced("bash", _section("Set up"))]
    assert blocks == [*setup, first_runs, _cluster_block().strip()] and len(setup) == 2, blocks
    assert {m for m in re.findall(r"^```(\w*)$", README, flags=re.M)} == {
        "bash",
        "console",
        "python",
        "text",
        "",  # the closing fences
    }


def test_the_setup_commands_are_cis_and_the_first_run_with_the_hub_model():
    main_block, test_block = (b.strip() for b in _fenced("bash", _section("Set up")))
    assert test_block in (ROOT / ".ci" / "run").read_text()
    install, _, job = main_block.partition(" && ")
    # The user's install is CI's without the dev extra.
    assert install == "pip install torch==2.13.0 -e ."
    assert "pip install torch==2.13.0 -e '.[dev]'" in test_block
    # The job is the first run's rerank, only with the hub model (downloaded) and its own output folder.
    online, offline = shlex.split(job), _first_runs()[0]
    for argv in (online, offline):
        argv[argv.index("--output") + 1] = "OUT"
    assert offline[offline.index("--model") + 1] == "dummy:tiny"
    offline[offline.index("--model") + 1] = HUB_MODEL
    assert online == offline


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for this module's jobs; one that this test worker already runs is used and left up."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # address="local": a fresh Ray of this process, never a cluster another test started with `ray start`.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def user_folder(tmp_path, monkeypatch) -> Path:
    """An empty folder holding the project's examples and configs, as the commands' working directory."""
    for name in ("examples", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


PATH_FLAGS = {"--input", "--output", "--positives", "--qrels", "--qrels-output", "--run", "--cache"}


def _absolute(args: list[str], folder: Path) -> list[str]:
    """The command's arguments with its relative paths under `folder`, as its working directory makes them:
    the shared Ray's workers run in another folder than a job started by the command would give them."""
    args = list(args)
    for i, arg in enumerate(args[1:], start=1):
        flag = args[i - 1]
        if flag in PATH_FLAGS and "://" not in arg:
            args[i] = str(folder / arg)
        elif flag == "--set" and arg.split("=")[0].endswith(".uri"):
            key, value = arg.split("=", 1)
            args[i] = f"{key}={folder / value}"
    return args


@pytest.mark.slow  # five jobs on one local Ray, three of them reranking
def test_the_first_runs_and_the_python_api_run_as_written(
    local_ray, user_folder, run_entry_point, shared_data
):
    results = {}
    for argv in _first_runs():
        assert argv[:2] == ["python", "-m"], argv
        result = run_entry_point(_main(argv[2]), *_absolute(argv[3:], user_folder))
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr[-3000:]}"
        key = argv[2] + (" --dry-run" if "--dry-run" in argv else "")
        results[key] = result
    assert list(results) == [
        "jobs.rerank",
        "jobs.rerank --dry-run",
        "pipeline.datasets",
        "jobs.hard_negatives",
        "jobs.cache",
        "jobs.index_quality",
        "jobs.eval_suite",
    ]

    # What the text below the block says each one leaves.
    summary = json.loads((user_folder / "out/skincare-dummy/summary.json").read_text())
    assert summary["input_rows"] == summary["scored_rows"] == 10
    assert summary["random_weights"] is True
    ranked = pq.read_table(user_folder / "out/skincare-dummy/ranked").to_pylist()
    assert sorted(r["rank"] for r in ranked) == list(range(1, 11))
    printed = json.loads(results["jobs.rerank"].stdout.strip().splitlines()[-1])
    assert printed["warning"].startswith("RANDOM WEIGHTS: dummy:tiny has random weights")

    plan = results["jobs.rerank --dry-run"].stdout
    assert "10 pairs in 1 shard(s)" in plan, plan[-2000:]
    assert re.findall(r"^ +(\d+) +[\d,]+ ", plan, flags=re.M) == ["1", "8"], plan[
        -2000:
    ]  # --gpus 1,8
    assert not (user_folder / "out/skincare-plan").exists()  # a plan writes nothing under --output

    pairs = pq.read_table(user_folder / "dl19.parquet")
    assert pairs.num_rows == 300 and len(set(pairs.column("query_id").to_pylist())) == 3
    qrels = (user_folder / "dl19.qrels.txt").read_text().splitlines()
    assert qrels and all(len(line.split()) == 4 for line in qrels)

    stats = json.loads((user_folder / "out/negatives/stats.json").read_text())
    assert stats["rows"] == 300 and stats["unscored_pairs"] == 0
    # Every candidate is kept or dropped with a reason (which, under random weights, says nothing).
    assert stats["kept_negatives"] + sum(stats["drop_reasons"].values()) == 300
    candidates = pq.read_table(user_folder / "out/negatives/candidates")
    assert candidates.num_rows == 300 and "drop_reason" in candidates.column_names

    (cache,) = json.loads(results["jobs.cache"].stdout)
    assert cache["entries"] == 300 and cache["unreadable_files"] == []

    metrics = json.loads((user_folder / "out/quality/metrics.json").read_text())
    assert 0 < metrics["overall"]["nDCG@10"] <= 1 and metrics["num_queries"] == 3
    assert (user_folder / "out/quality/report.html").stat().st_size > 0

    evaluation = json.loads((user_folder / "eval.json").read_text())
    assert evaluation["model"]["model"] == "dummy:tiny" and evaluation["model"]["random_weights"]
    suite = {p.stem for p in (ROOT / "configs" / "eval").glob("*.yaml")}
    assert set(evaluation["collections"]) == suite
    assert all(0 < c["num_queries"] <= 2 for c in evaluation["collections"].values())

    # The rerank job from Python, in the same folder: the README's second Python block as written.
    job_block = next(b for b in _fenced("python") if "from pipeline.rerank import" in b)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(job_block, "README.md", "exec"), {})
    scored, ranked_uri, parts = printed.getvalue().splitlines()[0].split(" ", 2)
    assert scored == "10" and ranked_uri.endswith("out/skincare-api/ranked") and "part-" in parts
    assert (
        sum(int(n) for n in printed.getvalue().splitlines()[1:]) == 3
    )  # output.top_k=3: one query


def test_the_engine_block_runs_as_written_on_a_random_weight_model():
    (block,) = [b for b in _fenced("python") if "from pipeline.model import CrossEncoder" in b]
    # The only change: no download here, so the hub model's architecture with random weights.
    assert block.count(f'"{HUB_MODEL}"') == 1
    names = {}
    exec(compile(block.replace(HUB_MODEL, "dummy:tiny"), "README.md", "exec"), names)
    assert len(names["scores"]) == len(names["pairs"]) == 2
    assert all(0 < s < 1 for s in names["scores"])
    assert [round(float(x), 6) for x in names["logits"]] != [
        round(float(s), 6) for s in names["scores"]
    ]
    (best,) = names["best"]
    assert set(best) == {"index", "document", "relevance_score"}
    assert best["relevance_score"] == pytest.approx(max(names["scores"]), rel=1e-3)


def _ray_flags(path: list[str]) -> set[str]:
    """The options the installed Ray's command line accepts for `ray <path>`, hidden ones included
    (`ray start --labels` is hidden in Ray 2.60's --help)."""
    import click
    from ray.scripts.scripts import cli

    command = cli
    for name in path:
        command = command.get_command(click.Context(command), name)
        assert command is not None, f"ray has no command {' '.join(path)}"
    return {o for p in command.params for o in p.opts if o.startswith("--")}


def _flags(tokens: list[str]) -> set[str]:
    """The options of a command line, up to a `--` that hands the rest to another command."""
    own = tokens[: tokens.index("--")] if "--" in tokens else tokens
    return {t.split("=")[0] for t in own if t.startswith("--")}


def test_the_cluster_commands_are_run_by_the_cluster_test_or_accepted_by_ray():
    submit_test = (ROOT / "tests" / "cluster" / "test_job_submit.py").read_text()
    for tokens in _commands(_cluster_block()):
        line = " ".join(tokens)
        if tokens[0] == "export":
            assert 'line.startswith("export ")' in submit_test, line
            continue
        if tokens[0] == "for":
            # The probe loop: bash syntax, and a `ray job submit` of the same address.
            assert subprocess.run(["bash", "-n", "-c", line], timeout=30).returncode == 0, line
            tokens = shlex.split(re.search(r"do (ray job submit .*?) >", line).group(1))
        assert tokens[0] == "ray", f"README: no test runs the cluster command {line!r}"
        command = tokens[1:3] if tokens[1] == "job" else tokens[1:2]
        assert _flags(tokens) <= _ray_flags(command), (line, _flags(tokens) - _ray_flags(command))
        if tokens[:3] == ["ray", "start", "--head"] or tokens[1] == "get-auth-token":
            # run as written on a real head: tests/cluster/test_job_submit.py
            assert f'_one(commands, "{" ".join(tokens[: 3 if tokens[1] == "start" else 2])}")' in (
                submit_test
            ), line
        elif tokens[1:3] == ["job", "submit"] and "jobs.rerank" in tokens:
            assert '_one(readme_cluster_commands(), "ray job submit")' in submit_test
            assert (ROOT / tokens[tokens.index("--config") + 1]).is_file()
        # Not run: the probe (test_job_submit waits for the job agent itself), a worker joining a head (a
        # second machine; its labels are the manifest's: tests/cluster/test_manifests.py), and `ray stop`,
        # which would end every Ray process on this machine, other tests' too.


def test_the_kuberay_commands_build_the_image_the_manifests_run():
    # docker and kubectl need a Docker daemon and a Kubernetes cluster with KubeRay, which no test machine has;
    # tests/cluster/test_manifests.py validates these manifests against KubeRay's CRD and the Dockerfile with
    # hadolint. Here: the image built is the image every applied manifest runs.
    (block,) = _fenced("console")
    commands = _commands(block)
    (build,) = [c for c in commands if c[:2] == ["docker", "build"]]
    tag = build[build.index("-t") + 1]
    assert build[-1] == "." and (ROOT / "Dockerfile").is_file()
    applied = [c[c.index("-f") + 1] for c in commands if c[:2] == ["kubectl", "apply"]]
    assert len(applied) + 1 == len(commands) and applied
    assert {Path(p).name for p in applied} == {"rayjob.yaml", "index-quality-nightly.yaml"}
    for path in applied:
        text = (ROOT / path).read_text()
        list(yaml.safe_load_all(text))  # parses
        images = set(re.findall(r"image: (\S+)", text))
        assert tag in images and all(i == tag or "kubectl" in i for i in images), (path, images)


def _synopses() -> list[str]:
    """Each command line of the ```text blocks, its indented continuation lines joined to it."""
    found: list[str] = []
    for block in _fenced("text"):
        for line in block.splitlines():
            if line.startswith("    ") and found:
                found[-1] += " " + line.strip()
            else:
                assert line.startswith("python -m "), (
                    f"README: a ```text line that is no synopsis: {line}"
                )
                found.append(line)
    return found


@pytest.mark.parametrize("synopsis", _synopses(), ids=lambda s: s.split()[2])
def test_every_synopsis_shows_flags_the_command_accepts(synopsis):
    tokens = re.sub(r"[\[\]|]", " ", synopsis).split()
    module = tokens[2]
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit) as done:
        run_main(_main(module), ["--help"])
    assert done.value.code == 0
    accepted = set(re.findall(r"--[a-z][a-z-]*", help_text.getvalue()))
    assert _flags(tokens) <= accepted, (module, _flags(tokens) - accepted)
    dtypes = re.search(r"--dtype ([\w|]+)", synopsis)
    if dtypes:
        assert set(dtypes.group(1).split("|")) <= set(DTYPES), dtypes.group(1)
    if module == "jobs.rerank":
        assert dtypes and dtypes.group(1).split("|") == list(DTYPES)  # every one, in --help's order
    # Each job shown is among the first runs (run above), or the benchmark (tests/benchmark runs it).
    assert module in {argv[2] for argv in _first_runs()} | {"jobs.benchmark"}


def _help_text(module: str) -> str:
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit) as done:
        run_main(_main(module), ["--help"])
    assert done.value.code == 0
    return text.getvalue()


def test_every_command_the_prose_names_exists_as_written():
    # Commands named inside sentences (their runs: the first runs above, tests/rerank/test_cache*.py for the
    # cache tool, tests/datasets/test_fetch.py for fetch): each module, subcommand and flag is the real one.
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M).replace("\n", " ")
    commands = re.findall(r"`(python -m [^`]+)`", prose)
    assert len(commands) >= 5, commands
    for command in commands:
        tokens = shlex.split(command)
        if tokens[2] == "pytest":
            assert command in (ROOT / ".ci" / "run").read_text() or tokens[-2:] == [
                "-m",
                "not slow",
            ]
            assert re.search(r'"slow: ', (ROOT / "pyproject.toml").read_text())  # a marker it knows
            continue
        help_text = _help_text(tokens[2])
        accepted = set(re.findall(r"--[a-z][a-z-]*", help_text))
        assert _flags(tokens) <= accepted, (command, _flags(tokens) - accepted)
        for word in (
            w for t in tokens[3:] if t.islower() and not t.startswith("-") for w in t.split("|")
        ):
            assert re.search(rf"\b{word}\b", help_text), (command, word)
