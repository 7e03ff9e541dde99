"""Tables, targets and plots of the peer benchmark (bench.peers writes the report with these)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

__all__ = ["markdown_section", "plot", "report", "targets"]

BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"
LABELS = {
    "raw": "raw pipe (aiokafka, no work)",
    "bare": "bare PenguiFlow (no Kafka)",
    "guide": "guide worker loop (8 workers)",
    "faststream": "FastStream (max_workers=256)",
    "pyrallel": "pyrallel-consumer (async, 256 in flight)",
    "gateway": "**gateway**",
}
WORKLOAD_TITLES = {"echo": "`echo`", "sleep": "`sleep` 20 ms", "noisy": "noisy neighbour"}
THROUGHPUT_PNG = "peers-throughput.png"
QUIET_PNG = "peers-quiet-latency.png"


def _all_runs(report: dict[str, Any], system: str, workload: str) -> list[dict[str, Any]]:
    return [r for r in report["runs"] if r["workload"] == workload and r["system"] == system]


def _rate(run: dict[str, Any]) -> float:
    """Throughput of one run: the backlog's, or the flood tenant's in the noisy mix."""
    name = "flood" if run["workload"] == "noisy" else "backlog"
    phase = _phase(run, name)
    if phase is None:
        return math.nan
    figures = phase["tenants"].get("flood") if name == "flood" else phase["overall"]
    return figures["jobs_per_s"] if figures else math.nan


def _run(report: dict[str, Any], system: str, workload: str) -> dict[str, Any] | None:
    """The system's median run on a workload by throughput (failed runs only if all failed)."""
    runs = _all_runs(report, system, workload)
    ok = sorted((r for r in runs if not math.isnan(_rate(r))), key=_rate)
    if ok:
        return ok[(len(ok) - 1) // 2]
    return runs[0] if runs else None


def _runs(report: dict[str, Any], workload: str) -> list[dict[str, Any]]:
    """One run per system (its median), in the order the systems ran."""
    systems = dict.fromkeys(r["system"] for r in report["runs"] if r["workload"] == workload)
    return [run for s in systems if (run := _run(report, s, workload)) is not None]


def _spread(report: dict[str, Any], system: str, workload: str) -> str:
    rates = sorted(
        rate for r in _all_runs(report, system, workload) if not math.isnan(rate := _rate(r))
    )
    if len(rates) < 2:
        return ""
    return f" ({rates[0]:,.0f}-{rates[-1]:,.0f})"


def round_ratios(report: dict[str, Any], system: str, base: str, workload: str) -> list[float]:
    """system/base throughput within each round in which both ran (same minute, same load)."""
    rates = {r["round"]: _rate(r) for r in _all_runs(report, base, workload)}
    ratios = []
    for run in _all_runs(report, system, workload):
        base_rate = rates.get(run["round"], math.nan)
        if base_rate and not math.isnan(base_rate) and not math.isnan(_rate(run)):
            ratios.append(_rate(run) / base_rate)
    return ratios


def median_ratio(report: dict[str, Any], system: str, base: str, workload: str) -> float:
    """Median over rounds of system/base throughput; nan if they never ran together."""
    ratios = sorted(round_ratios(report, system, base, workload))
    if not ratios:
        return math.nan
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def _phase(run: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    if run is None or run["error"]:
        return None
    return next((p for p in run["phases"] if p["name"] == name), None)


def throughput(report: dict[str, Any], system: str, workload: str) -> float:
    """Jobs/s of a system on a workload (its median run); nan if it did not run.

    For the noisy mix: the flood tenant's jobs from its burst to its last result (the
    quiet tenant's paced jobs would make every fast system look as slow as its pace).
    """
    run = _run(report, system, workload)
    return _rate(run) if run is not None else math.nan


def per_cpu_second(report: dict[str, Any], system: str, workload: str) -> float:
    """Jobs per CPU second of the system's own process(es) on a backlog workload."""
    phase = _phase(_run(report, system, workload), "backlog")
    cpu = phase["overall"]["cpu_s_per_1000"] if phase else math.nan
    return 1000 / cpu if cpu and not math.isnan(cpu) else math.nan


def _ms(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "no result"
    return f"{value:,.0f}"


def _num(value: float, digits: int = 0) -> str:
    if value is None or math.isnan(value) or math.isinf(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(value: float, base: float, digits: int = 2) -> str:
    if not base or math.isnan(base) or math.isnan(value):
        return "n/a"
    return f"{value / base:.{digits}f}"


def _first_line(run: dict[str, Any]) -> str:
    return str(run["error"]).splitlines()[0].replace("|", "/")


def _load(run: dict[str, Any]) -> str:
    return f"{run['load_before'][0]:.1f}/{run['load_after'][0]:.1f}"


def backlog_table(report: dict[str, Any], workload: str) -> list[str]:
    lines = [
        "| system | jobs/s (range) | x raw pipe | x bare PenguiFlow | p50 ms | p99 ms"
        " | CPU s / 1,000 jobs | peak RSS MiB | done | load before/after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in _runs(report, workload):
        label = LABELS.get(run["system"], run["system"])
        phase = _phase(run, "backlog")
        if phase is None:
            lines.append(f"| {label} | failed: {_first_line(run)} | | | | | | | | |")
            continue
        o = phase["overall"]
        spread = _spread(report, run["system"], workload)
        lines.append(
            f"| {label} | {_num(o['jobs_per_s'])}{spread}"
            f" | {_num(median_ratio(report, run['system'], 'raw', workload), 2)}"
            f" | {_num(median_ratio(report, run['system'], 'bare', workload), 2)}"
            f" | {_ms(o['p50_ms'])} | {_ms(o['p99_ms'])}"
            f" | {_num(o['cpu_s_per_1000'], 2)} | {_num(o['peak_rss_mb'])}"
            f" | {o['done']:,}/{o['sent']:,} | {_load(run)} |"
        )
    return lines


def _quiet(phase: dict[str, Any] | None) -> dict[str, Any] | None:
    return phase["tenants"].get("quiet") if phase else None


def noisy_table(report: dict[str, Any]) -> list[str]:
    raw = throughput(report, "raw", "noisy")
    bare = throughput(report, "bare", "noisy")
    lines = [
        "| system | flood jobs/s | x raw pipe | x bare | flood p50 / p99 ms"
        " | quiet alone p50 / p99 ms | quiet in flood p50 / p99 ms | in-flood p99 / alone p99"
        " | within 2x | flood done | quiet done | CPU s / 1,000 | peak RSS MiB | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|",
    ]
    for run in _runs(report, "noisy"):
        label = LABELS.get(run["system"], run["system"])
        solo, flood = _phase(run, "solo"), _phase(run, "flood")
        if solo is None or flood is None:
            lines.append(f"| {label} | failed: {_first_line(run)} |" + " |" * 12)
            continue
        q_solo, q_flood = _quiet(solo), _quiet(flood)
        f = flood["tenants"].get("flood", {})
        o = flood["overall"]
        factor = q_flood["p99_ms"] / q_solo["p99_ms"] if q_solo["p99_ms"] else math.nan
        within = "yes" if factor <= 2 else "no"
        rate = throughput(report, run["system"], "noisy")
        lines.append(
            f"| {label} | {_num(rate)} | {_ratio(rate, raw)} | {_ratio(rate, bare)}"
            f" | {_ms(f.get('p50_ms', math.nan))} / {_ms(f.get('p99_ms', math.nan))}"
            f" | {_ms(q_solo['p50_ms'])} / {_ms(q_solo['p99_ms'])}"
            f" | {_ms(q_flood['p50_ms'])} / {_ms(q_flood['p99_ms'])}"
            f" | {_num(factor, 1) if not math.isinf(factor) else 'inf'} | {within}"
            f" | {f.get('done', 0):,}/{f.get('sent', 0):,}"
            f" | {q_flood['done']}/{q_flood['sent']}"
            f" | {_num(o['cpu_s_per_1000'], 2)} | {_num(o['peak_rss_mb'])} | {_load(run)} |"
        )
    return lines


def quiet_factor(report: dict[str, Any], system: str) -> float:
    """Quiet tenant's p99 during the flood over its p99 alone (inf: results missing)."""
    run = _run(report, system, "noisy")
    solo, flood = _quiet(_phase(run, "solo")), _quiet(_phase(run, "flood"))
    if solo is None or flood is None or not solo["p99_ms"]:
        return math.nan
    return flood["p99_ms"] / solo["p99_ms"]


def targets(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the four targets of issue 8; met None = not measured."""
    out: list[tuple[str, str, bool | None]] = []

    def ratio_target(name: str, base: str, workload: str, goal: float) -> None:
        ratios = round_ratios(report, "gateway", base, workload)
        if not ratios:
            out.append((name, "not measured", None))
            return
        ratio = median_ratio(report, "gateway", base, workload)
        rounds = " / ".join(f"{r:.2f}" for r in ratios)
        shown = (
            f"{ratio:.2f} (rounds: {rounds}; medians {throughput(report, 'gateway', workload):,.0f}"
        )
        shown += f" vs {throughput(report, base, workload):,.0f} jobs/s)"
        out.append((name, shown, ratio >= goal))

    ratio_target("gateway >= 0.70 x bare PenguiFlow on `echo`", "bare", "echo", 0.70)
    # Wall-clock rates suffer from whatever else the machine runs; jobs per CPU second
    # (what one core would do) is the cross-check that load hardly moves.
    gateway_cpu, bare_cpu = (
        per_cpu_second(report, "gateway", "echo"),
        per_cpu_second(report, "bare", "echo"),
    )
    if not math.isnan(gateway_cpu) and not math.isnan(bare_cpu):
        out.append(
            (
                "same, per CPU second (cross-check, not the target)",
                f"{gateway_cpu / bare_cpu:.2f} ({gateway_cpu:,.0f} vs {bare_cpu:,.0f} jobs per CPU s)",
                gateway_cpu / bare_cpu >= 0.70,
            )
        )
    ratio_target("gateway >= 3 x the guide's loop on `sleep`", "guide", "sleep", 3.0)
    for workload in ("echo", "sleep"):
        ratio_target(f"gateway >= FastStream on `{workload}`", "faststream", workload, 1.0)
    factors = {
        r["system"]: quiet_factor(report, r["system"])
        for r in _runs(report, "noisy")
        if not math.isnan(quiet_factor(report, r["system"]))
    }
    keeping = sorted(s for s, f in factors.items() if f <= 2)
    if "gateway" not in factors:
        out.append(("only the gateway keeps quiet p99 <= 2 x alone", "not measured", None))
    else:
        shown = ", ".join(
            f"{s} {'inf' if math.isinf(f) else f'{f:.1f}x'}" for s, f in factors.items()
        )
        out.append(("only the gateway keeps quiet p99 <= 2 x alone", shown, keeping == ["gateway"]))
    return out


def markdown_section(report: dict[str, Any], results_link: str = "bench/results") -> str:
    sizes = report["sizes"]
    loads = [r["load_before"][0] for r in report["runs"]] + [
        r["load_after"][0] for r in report["runs"]
    ]
    lines = [
        BEGIN,
        "",
        f"Generated by `bench.peers` ({report['mode']} mode) on {report['started']} UTC"
        f" at commit {report['machine'].get('commit', 'unknown')};"
        f" {report['machine']['cores']} cores, Python {report['machine']['python']}; 1-minute"
        f" load average {min(loads, default=0):.1f} to {max(loads, default=0):.1f} over the runs"
        " (shown per run as before/after).",
        f"Sizes: `echo` {sizes['echo_jobs']:,} jobs, `sleep` {sizes['sleep_jobs']:,} jobs"
        f" (the guide's loop gets 1/{sizes['guide_divisor']} of each), each run"
        f" {sizes.get('repeats', 1)} times in rounds over all systems (the median run is shown,"
        " the range of jobs/s in brackets; ratios are medians of the ratios within each round);"
        " noisy mix, once per system: flood"
        f" {sizes['flood_jobs']:,} `sleep` jobs at once while quiet sends {sizes['quiet_rate']:g}/s"
        f" for {sizes['quiet_s']:g} s (alone first for {sizes['solo_s']:g} s).",
        "",
    ]
    for workload in ("echo", "sleep"):
        if _runs(report, workload):
            lines += [f"#### {WORKLOAD_TITLES[workload]}", "", *backlog_table(report, workload), ""]
    if _runs(report, "noisy"):
        lines += ["#### Noisy neighbour", "", *noisy_table(report), ""]
    lines += ["#### Targets", "", "| target | measured | met |", "|---|---|:-:|"]
    for name, measured, met in targets(report):
        verdict = "n/a" if met is None else ("**yes**" if met else "**no**")
        lines.append(f"| {name} | {measured} | {verdict} |")
    lines.append("")
    for system, why in report["skipped"].items():
        lines.append(f"Not run: {system}: {why}")
    if report["skipped"]:
        lines.append("")
    lines += [
        f"![Throughput per system and workload]({results_link}/{THROUGHPUT_PNG})",
        "",
        f"![Quiet tenant latency during the flood]({results_link}/{QUIET_PNG})",
        "",
        END,
    ]
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    """Replace the section between the peers markers (or append it under a heading)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n## Against peers (issue 8)\n\n" + section + "\n"
    path.write_text(text)


def plot(report: dict[str, Any], results_dir: Path) -> list[Path]:
    """The throughput bar chart and the quiet tenant's latency over the flood."""
    import matplotlib as mpl  # a bench-only dependency

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in report["runs"]))
    workloads = [w for w in ("echo", "sleep", "noisy") if _runs(report, w)]
    colours = {
        s: f"C{i}"
        for i, s in enumerate(["raw", "bare", "guide", "faststream", "pyrallel", "gateway"])
    }
    names = {k: v.replace("**", "") for k, v in LABELS.items()}

    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        xs = [w + (i - (len(systems) - 1) / 2) * width for w in range(len(workloads))]
        ys = [throughput(report, system, w) for w in workloads]
        bars = ax.bar(
            xs,
            [0 if math.isnan(y) else y for y in ys],
            width,
            label=names.get(system, system),
            color=colours.get(system),
        )
        for bar, y in zip(bars, ys, strict=True):
            if not math.isnan(y):
                ax.annotate(
                    f"{y:,.0f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(workloads)), [WORKLOAD_TITLES[w].replace("`", "") for w in workloads])
    ax.set_yscale("log")
    ax.set_ylabel("jobs/s (log scale)")
    ax.set_title(
        f"Throughput per system and workload ({report['mode']} run, {report['started'][:10]})"
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    fig.tight_layout()
    paths = [results_dir / THROUGHPUT_PNG]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 6))
    for run in _runs(report, "noisy"):
        flood = _phase(run, "flood")
        if flood is None:
            continue
        series = flood["quiet_series"]
        xs = [x for x, y in series if y is not None]
        ys = [y for _, y in series if y is not None]
        missing = sum(1 for _, y in series if y is None)
        label = names.get(run["system"], run["system"])
        if missing:
            label += f" ({missing} of {len(series)} without result)"
        ax.plot(
            xs,
            ys,
            label=label,
            color=colours.get(run["system"]),
            linewidth=1.2,
            marker=".",
            markersize=3,
        )
    gateway_solo = _quiet(_phase(_run(report, "gateway", "noisy"), "solo"))
    if gateway_solo is not None and not math.isnan(gateway_solo["p99_ms"]):
        bound = 2 * gateway_solo["p99_ms"]
        ax.axhline(bound, color=colours["gateway"], linestyle="--", linewidth=0.8)
        ax.annotate(
            f"2 x gateway's quiet p99 alone ({bound:.0f} ms)", (0, bound), fontsize=7, va="bottom"
        )
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the flood began (when the quiet job was sent)")
    ax.set_ylabel("quiet tenant: produce to result, ms (log scale)")
    ax.set_title("Quiet tenant latency during the flood, one line per system")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    paths.append(results_dir / QUIET_PNG)
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def report(data: dict[str, Any], *, results_dir: Path, markdown: Path | None, plots: bool) -> None:
    """Print the tables; write the plots and the BENCHMARKS.md section when asked."""
    section = markdown_section(data)
    shown = [line for line in section.splitlines() if line not in (BEGIN, END)]
    if not plots:
        shown = [line for line in shown if not line.startswith("![")]
    print()
    print("\n".join(shown).strip())
    if plots:
        for path in plot(data, results_dir):
            print(f"wrote {path}")
    if markdown is not None:
        write_markdown(markdown, section)
        print(f"updated {markdown}")
