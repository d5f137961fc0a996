"""The benchmark report as a short markdown table (what the job prints and the README shows)."""

from __future__ import annotations

import posixpath

from pipeline.core.storage import url_to_fs, write_json


def write_report(output: str, report: dict, table: str, command: str) -> str:
    """The JSON report at `output` (local path or URI) and the markdown table beside it (.md), headed by
    the command that produced them. Returns the table's path."""
    fs, path = url_to_fs(output)
    fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    write_json(fs, path, report)
    table_path = (path[:-5] if path.endswith(".json") else path) + ".md"
    with fs.open(table_path, "w") as f:
        f.write(f"Command: {command}\n\n{table}\n")
    return table_path


def _num(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _batch(r: dict) -> str:
    settings = r.get("settings") or {}
    if settings.get("batch_size") is not None:
        return str(settings["batch_size"]) + (" (tuned)" if r.get("tuning") else "")
    return "tokens" if settings.get("max_tokens_per_batch") else "n/a"


def _peak(peak: dict) -> str:
    """The higher peak, which MFU divides by, and both measurements: far apart, the host's speed drifted."""
    figures = [peak.get(when, {}).get("flops_per_s") for when in ("before", "after")]
    drift = (
        f" (before {figures[0] / 1e9:.0f}, after {figures[1] / 1e9:.0f})"
        if None not in figures
        else ""
    )
    return f"{peak['flops_per_s'] / 1e9:.0f} GFLOP/s{drift}"


def _speed(r: dict) -> str:
    """pairs/s of the fastest round, and the slowest round's where there were several."""
    rounds = r.get("pairs_per_s_rounds") or []
    slowest = f" ({min(rounds):.2f})" if len(rounds) > 1 else ""
    return f"{r['pairs_per_s']:.2f}{slowest}"


def _plan(model: str, info: dict) -> str:
    """What ran on `model`: its contenders grouped by the workloads they scored, the reference marked."""
    groups: dict[tuple, list[str]] = {}
    for name, workloads in info["plan"].items():
        marked = f"{name} (reference)" if name == info.get("fidelity_reference") else name
        groups.setdefault(tuple(workloads), []).append(marked)
    return (
        f"{model}: "
        + "; ".join(f"{', '.join(names)} on {', '.join(w)}" for w, names in groups.items())
        + "."
    )


def markdown_table(report: dict) -> str:
    """One row per (model, workload, contender); `engine x` = engine pairs/s over the row's (> 1: engine faster);
    `CPU share` = CPU time the contender's process got over wall time x threads (< 100%: the machine was shared);
    `max |Δlogit|`, `Spearman`, `top-10` = the row's scores against the float32 reference's on its pairs (the
    footer names it: st-default or hf-fp32);
    with several rounds, pairs/s is the fastest round's, the slowest in parentheses."""
    lines = [
        "| model | workload | contender | dtype | batch | pairs | pairs/s | real tokens/s | padding eff. | MFU "
        "| peak RSS (MB) | CPU share | engine x | max \\|Δlogit\\| | Spearman | top-10 |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        if "skipped" in r:
            lines.append(
                f"| {r['model']} | {r['workload']} | {r['contender']} | skipped: {r['skipped']} "
                + "| " * 12
                + "|"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['contender']} | {r['dtype']} | {_batch(r)} | {r['n_pairs']} "
            f"| {_speed(r)} | {r['real_tokens_per_s']:.0f} | {r['padding_efficiency']:.2f} "
            f"| {_pct(r['mfu'])} | {_num(r['peak_rss_mb'], '.0f')} | {_pct(r.get('cpu_share'))} "
            f"| {_num(r.get('engine_speedup'), '.2f')} | {_num(r.get('max_abs_logit_diff'), '.3f')} "
            f"| {_num(r.get('spearman'), '.4f')} | {_num(r.get('top10_overlap'), '.2f')} |"
        )
    spreads = [
        f"{model} {workload} {std:.2f} ({info.get('fidelity_reference', 'hf-fp32')})"
        for model, info in report.get("models", {}).items()
        for workload, std in info.get("reference_logit_std", {}).items()
    ]
    if spreads:
        lines += ["", "Fidelity reference's logit spread (std): " + "; ".join(spreads) + "."]
    prompts = [
        f"{model} through the {info['prompt_template']} template"
        for model, info in report.get("models", {}).items()
        if info.get("prompt_template")
    ]
    if prompts:
        lines += [
            "",
            "Decoder prompts: "
            + "; ".join(prompts)
            + ", the same prompt tokens for every contender (the libraries get the pairs formatted as the "
            f"seq-cls model cards do); none truncated at max_length={report['config']['max_length']} "
            "(checked before the run).",
        ]
    plans = [
        _plan(model, info) for model, info in report.get("models", {}).items() if info.get("plan")
    ]
    if plans:
        lines += ["", "Plan (contender_scope): " + " ".join(plans)]
    peaks = [
        f"{model}: "
        + ", ".join(
            f"{short} {_peak(p[dtype])}"
            for short, dtype in (("bf16", "bfloat16"), ("fp32", "float32"))
        )
        for model, p in report.get("peak_gemm", {}).items()
    ]
    machine = report["machine"]
    units = ", ".join(machine.get("bf16_matrix_units") or []) or "none (bf16 emulated)"
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, bf16 matrix units: {units}, torch {machine['torch']}; "
        f"load average {machine['load_average_before']:.1f} before, {machine.get('load_average_after', 0):.1f} after.",
        "Peak GEMM (best of F.linear and oneDNN linear over the model's shapes, measured before and after the "
        "contenders; MFU divides by the higher): " + "; ".join(peaks) + ".",
    ]
    if report.get("targets"):
        lines += ["", "| target | model | value | goal | met |", "|---|---|---:|---:|---|"]
        for t in report["targets"]:
            percent = t.get("unit", "percent" if "MFU" in t["name"] else "ratio") == "percent"
            value = f"{100 * t['value']:.1f}%" if percent else f"{t['value']:.2f}x"
            goal = f"{100 * t['target']:.0f}%" if percent else f"{t['target']:.0f}x"
            lines.append(
                f"| {t['name']} | {t['model']} | {value} | {goal} | {'yes' if t['met'] else 'no'} |"
            )
    if report.get("cross_model"):
        first = report["cross_model"][0]["engine_on"]
        shown = [
            c
            for c in report["cross_model"]
            if c["versus"].split(" on ")[0] in ("engine", "st-default", "st-best")
        ]
        lines += [
            "",
            f"Engine on {first}, its pairs/s over: "
            + "; ".join(f"{c['versus']} ({c['workload']}) {c['ratio']:.1f}x" for c in shown)
            + ".",
        ]
    for e in report.get("errors", []):
        lines.append(f"\nERROR {e['model']} / {e['contender']}: {e['message']}")
    return "\n".join(lines)
