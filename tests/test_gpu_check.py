"""scripts/gpu_check.py keeps what it measured: its data travels in a prepared folder, its report is rewritten
after every step, a failing step is recorded while the later ones run, and SIGTERM (what `timeout` sends)
leaves a report of the steps done so far. Run as users run it: `python3 scripts/gpu_check.py` in its own
process, here with `--device cpu --small` on a tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_script()


@pytest.fixture(scope="module")
def prepared(gpu_check, shared_data, tmp_path_factory) -> Path:
    """The data folder `--prepare` makes from the shared data (what travels to a GPU machine)."""
    target = tmp_path_factory.mktemp("gpu-data")
    assert gpu_check.main(["--prepare", str(target), "--data-dir", str(shared_data)]) == 0
    return target


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory) -> str:
    """A tiny transformers-layout checkpoint whose tokenizer saw a slice of the prepared data's text."""
    from pipeline.benchmark.checkpoints import tokenizer_corpus
    from pipeline.model.dummy import ARCHITECTURES, build_checkpoint

    corpus = tokenizer_corpus(prepared)
    arch = replace(
        ARCHITECTURES["tiny"],
        layout="xlm_roberta",
        tokenizer_vocab=3000,
        initializer_range=0.2,
        max_position_embeddings=1026,
    )
    return build_checkpoint(
        str(tmp_path_factory.mktemp("tiny")), arch, corpus[:800] + corpus[-3000::10]
    )


def start(
    checkpoint: str, data_dir: Path, out: Path, *extra: str, env: dict | None = None
) -> subprocess.Popen:
    argv = [
        sys.executable,
        str(SCRIPT),
        "--device",
        "cpu",
        "--small",
        "--checkpoint",
        checkpoint,
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_prepare_copies_every_file_the_check_reads(gpu_check, prepared, shared_data):
    for name in gpu_check.DATA_FILES:
        assert (prepared / name).read_bytes() == (shared_data / name).read_bytes(), name
    assert sum(p.stat().st_size for p in prepared.rglob("*") if p.is_file()) < 25 * 2**20


def test_a_data_folder_without_the_files_is_one_error_line(gpu_check, tmp_path, capsys):
    code = gpu_check.main(
        ["--device", "cpu", "--small", "--data-dir", str(tmp_path), "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--prepare" in err[0]
    assert not (tmp_path / "gpu-check.json").exists()


def test_prepare_from_a_folder_without_the_data_is_one_error_line(gpu_check, tmp_path, capsys):
    code = gpu_check.main(["--prepare", str(tmp_path / "to"), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "trec-dl/" in err[0]


def new_check(gpu_check, tmp_path, budget_s: float, hard_timeouts: bool = False):
    args = gpu_check.parse_args(
        ["--device", "cpu", "--small", "--out", str(tmp_path), "--budget-s", str(budget_s)]
    )
    return gpu_check.Check(args, gpu_check.SMALL, hard_timeouts)


def test_each_step_is_recorded_as_it_ends_failed_cut_short_or_skipped(gpu_check, tmp_path):
    check = new_check(gpu_check, tmp_path, budget_s=100)
    on_disk = lambda: json.loads((tmp_path / "gpu-check.json").read_text())  # noqa: E731

    check.run_step("environment", lambda deadline: {"torch": "x"})
    report = on_disk()  # written as the step ended, the rest still pending
    assert report["steps"]["environment"]["status"] == "ok" and report["environment"] == {
        "torch": "x"
    }
    assert {s["status"] for name, s in report["steps"].items() if name != "environment"} == {
        "pending"
    }

    check.run_step("checkpoint", lambda deadline: {"cut_short": True, "rows": [1]})

    def boom(deadline):
        raise ValueError("no GEMM today")

    check.run_step("peak_gemm", boom)
    calls = []
    check.run_step(
        "workloads", lambda deadline: calls.append("workloads") or {"dl19": 1}
    )  # needs a cut-short step
    check.run_step(
        "scorer_throughput", lambda deadline: calls.append("throughput")
    )  # needs the failed peak_gemm

    def not_here(deadline):
        raise gpu_check.StepSkipped("no float8 tensor cores")

    check.run_step(
        "fp8_fidelity", not_here
    )  # a step that does not apply here: skipped, not an error
    check.deadline = time.monotonic()  # the whole budget spent
    check.run_step("parity", lambda deadline: calls.append("parity"))
    report = on_disk()
    steps = report["steps"]
    assert steps["checkpoint"]["status"] == "cut_short" and report["checkpoint"]["rows"] == [1]
    assert (
        steps["peak_gemm"]["status"] == "failed"
        and steps["peak_gemm"]["error"]["type"] == "ValueError"
    )
    assert "no GEMM today" in steps["peak_gemm"]["error"]["traceback"] and "peak_gemm" not in report
    assert calls == ["workloads"] and steps["workloads"]["status"] == "ok"
    assert (
        steps["scorer_throughput"]["status"] == "skipped"
        and "peak_gemm" in steps["scorer_throughput"]["reason"]
    )
    assert steps["parity"]["status"] == "skipped" and "budget" in steps["parity"]["reason"]
    assert steps["fp8_fidelity"] == {
        **steps["fp8_fidelity"],
        "status": "skipped",
        "reason": "no float8 tensor cores",
    }
    assert [e["step"] for e in report["errors"]] == ["peak_gemm"]


def test_a_step_past_its_budget_is_stopped_and_the_next_runs(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_SHARE_S", 0.0)
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.3)
    check = new_check(
        gpu_check, tmp_path, budget_s=20, hard_timeouts=True
    )  # environment's share: 0.4 s

    def hang(deadline):
        end = time.monotonic() + 10
        while time.monotonic() < end:  # ignores its deadline, as a kernel that takes too long would
            time.sleep(0.02)

    previous = gpu_check.install_signal_handlers()
    try:
        started = time.monotonic()
        check.run_step("environment", hang)
        stopped_after = time.monotonic() - started
        check.run_step("checkpoint", lambda deadline: {"directory": "x"})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    steps = json.loads((tmp_path / "gpu-check.json").read_text())["steps"]
    assert (
        steps["environment"]["status"] == "timed_out"
        and "hang" in steps["environment"]["error"]["traceback"]
    )
    assert 0.5 < stopped_after < 5
    assert steps["checkpoint"]["status"] == "ok"


@pytest.mark.slow  # every step once on CPU: ~1-3 minutes on 2 shared cores
def test_a_failing_step_is_recorded_and_the_later_steps_still_run(
    gpu_check, checkpoint, prepared, tmp_path
):
    # --standins: the engine runs its CUDA code paths (varlen attention, fp8 through CUDA's _scaled_mm contract)
    process = start(
        checkpoint,
        prepared,
        tmp_path,
        "--standins",
        "--budget-s",
        "900",
        env={gpu_check.FAIL_STEP_ENV: "parity"},
    )
    output, _ = process.communicate(timeout=1200)
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert process.returncode == 1, output[
        -3000:
    ]  # a failed step fails the run, after the report is complete
    steps = report["steps"]
    assert list(steps) == gpu_check.STEPS and report["complete"]
    parity = steps["parity"]
    assert parity["status"] == "failed" and parity["error"]["type"] == "RuntimeError"
    assert "made to fail on purpose" in parity["error"]["message"]
    assert "RuntimeError" in parity["error"]["traceback"]
    assert "parity" not in report and [e["step"] for e in report["errors"]] == ["parity"]
    assert {name: s["status"] for name, s in steps.items() if name != "parity"} == dict.fromkeys(
        [s for s in gpu_check.STEPS if s != "parity"], "ok"
    ), output[-3000:]
    # the engine on token ids: both dtypes (CPU torch runs _scaled_mm as a reference), MFU against each peak
    rows = {(r["dtype"], r["workload"]): r for r in report["scorer_throughput"]["rows"]}
    assert set(rows) == {(d, w) for d in ("bfloat16", "float8") for w in ("dl19", "long")}
    assert rows[("bfloat16", "long")]["n_pairs"] == gpu_check.SMALL["token_pairs"]["long"]
    assert rows[("bfloat16", "long")]["mean_tokens"] > 2 * rows[("bfloat16", "dl19")]["mean_tokens"]
    assert all(0 < r["mfu"] and r["pairs_per_s"] > 0 for r in rows.values())
    assert report["standins"] and {r["attention_backend"] for r in rows.values()} == {
        "flash_attn_varlen"
    }
    assert rows[("float8", "dl19")]["linear_kernel"] != rows[("bfloat16", "dl19")]["linear_kernel"]
    assert set(report["peak_gemm"]) == {"bfloat16", "float32", "float8"}
    assert {r["contender"] for r in report["runs"]} == {label for label, *_ in gpu_check.CONTENDERS}
    assert set(report["contenders"]["engine_over_st_best"]) == {"dl19", "long"}
    assert (
        report["invariance"]["ranks_identical"] and report["scorer_stage"]["equal_to_score_tokens"]
    )
    assert report["fp8_fidelity"]["pairs"] == gpu_check.SMALL["parity_pairs"]
    table = (tmp_path / "gpu-check.md").read_text()
    assert "| parity | failed |" in table and "error in parity: RuntimeError" in table


@pytest.mark.slow  # start-up and the first steps on CPU, ~30-60 s on 2 shared cores
def test_sigterm_mid_run_leaves_the_report_of_the_steps_done(checkpoint, prepared, tmp_path):
    process = start(checkpoint, prepared, tmp_path, "--budget-s", "900")
    report_path, deadline = tmp_path / "gpu-check.json", time.monotonic() + 600
    report = None
    try:
        while (
            time.monotonic() < deadline and process.poll() is None
        ):  # wait for the parity step to start
            try:
                report = json.loads(
                    report_path.read_text()
                )  # atomic rewrites: never a half-written file
            except FileNotFoundError:
                report = None
            if report and report["steps"]["parity"]["status"] == "running":
                break
            time.sleep(0.05)
        assert report and report["steps"]["parity"]["status"] == "running", report
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, output[-3000:]
    report = json.loads(report_path.read_text())
    steps = report["steps"]
    assert report["interrupted"] == "SIGTERM" and not report["complete"]
    assert [
        steps[s]["status"] for s in ("environment", "checkpoint", "peak_gemm", "workloads")
    ] == ["ok"] * 4
    assert (
        steps["parity"]["status"] == "interrupted"
        and "Interrupted" in steps["parity"]["error"]["traceback"]
    )
    assert (
        report["peak_gemm"]["bfloat16"]["flops_per_s"] > 0
    )  # the figures of the steps done are there
    assert all(
        steps[s]["status"] == "pending" for s in ("invariance", "scorer_throughput", "scorer_stage")
    )
