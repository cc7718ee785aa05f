"""Turns a pytest-benchmark JSON into a markdown speedup report and a plot of linear speedup against M.

    pytest benchmarks --benchmark-only --benchmark-json=results.json
    python -m benchmarks.report results.json            # writes results.md and results.png beside the JSON

Every speedup is a ratio of medians from the same run: baseline median / our median, within one benchmark
group (same shape and M, or same layer and batch, or same model and setting). Targets (``extra_info
["targets"]``, set by the benchmarks from the issues) are checked and misses marked; a verdict that the run's
noise cannot settle (the target inside the figure's quartile range) is marked "within noise".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
from collections import defaultdict
from typing import Callable, Optional

KIND_TITLES = {"linear": "Linear", "conv2d": "Conv2d", "e2e": "End to end"}
# The baseline every linear speedup is also plotted against.
LINEAR_FLOAT_BASELINE = "fp32 F.linear"


class Run:
    """The benchmarks of one JSON, indexed by group and implementation."""

    def __init__(self, data: dict):
        self.facts = data.get("quantkernels", {})
        self.machine = data.get("machine_info", {})
        self.datetime = data.get("datetime", "")
        commit = data.get("commit_info", {})
        self.commit = (commit.get("id") or "unknown")[:12] + (" (with uncommitted changes)" if commit.get("dirty") else "")
        self.benchmarks = [b for b in data["benchmarks"] if "impl" in b.get("extra_info", {})]
        self.by_group = defaultdict(dict)
        for b in self.benchmarks:
            self.by_group[b["group"]][b["extra_info"]["impl"]] = b

    def kinds(self):
        present = dict.fromkeys(b["extra_info"].get("kind", "other") for b in self.benchmarks)
        return [k for k in KIND_TITLES if k in present] + [k for k in present if k not in KIND_TITLES]

    def of_kind(self, kind):
        return [b for b in self.benchmarks if b["extra_info"].get("kind", "other") == kind]

    def median(self, group, impl):
        b = self.by_group[group].get(impl)
        return b["stats"]["median"] if b else None

    def speedup(self, ours, baseline_impl):
        base = self.median(ours["group"], baseline_impl)
        return base / ours["stats"]["median"] if base else None


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def is_warm(b) -> bool:
    return b is not None and b["extra_info"].get("cache", "cold") != "cold"


def header(run: Run) -> list:
    f = run.facts
    cpu = f.get("cpu_model") or run.machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    lines = [
        "# quantkernels benchmark report",
        "",
        f"- CPU: {cpu} ({f.get('cpu_flags', 'flags unknown')}); torch {f.get('torch_version', '?')} on "
        f"{f.get('torch_threads', '?')} threads; quantkernels on its {f.get('isa', '?')} path",
        f"- Run {run.datetime} at commit {run.commit}",
    ]
    if "bandwidth_GBps" in f:
        lines.append(
            f"- Streaming-read bandwidth measured in this run: {f['bandwidth_GBps']:.1f} GB/s "
            f"(the faster of torch.sum and GEMVs over {f['bandwidth_buffer_bytes'] / 2**20:.0f} MiB); the memory "
            "floor of a benchmark is "
            "its weight bytes divided by this."
        )
    if "rotation_bytes" in f:
        lines.append(
            f"- Weights rotated over distinct copies totalling {f['rotation_bytes'] / 2**30:.1f} GiB "
            f"(L3 {f.get('l3_bytes', 0) / 2**20:.0f} MiB), so each call reads its weights from memory."
        )
    if "allocator_settled" in f:
        lines.append(
            "- Allocator: glibc's mmap and trim thresholds fixed at 32 and 64 MiB for every implementation"
            if f["allocator_settled"] else "- Allocator: thresholds not fixed (not glibc): outputs may page-fault"
        )
    spreads = [b["stats"]["iqr"] / b["stats"]["median"] for b in run.benchmarks if b["stats"]["median"] > 0]
    if spreads:
        lines.append(
            f"- Noise: interquartile range / median is {statistics.median(spreads):.0%} for the median benchmark "
            f"and {max(spreads):.0%} at worst; ratios closer to 1 than that are not significant."
        )
    lines.append(f"- {len(run.benchmarks)} benchmarks. Speedup = baseline median / our median, same run, same group.")
    return lines


def quartile_range(ours: dict, baseline: Optional[dict], measured: float):
    """How far the measured figure moves within the two benchmarks' interquartile ranges: a speedup from
    baseline q1 / our q3 to baseline q3 / our q1; a floor ratio (no baseline) from our q1 to our q3."""
    q1, q3, median = ours["stats"]["q1"], ours["stats"]["q3"], ours["stats"]["median"]
    if baseline is None:
        return measured * q1 / median, measured * q3 / median
    return baseline["stats"]["q1"] / q3, baseline["stats"]["q3"] / q1


def verdict(met: bool, range_meets: tuple) -> str:
    """met / **MISS** from the medians; "within noise" where the quartile range has the target on both sides."""
    if range_meets[0] == range_meets[1]:
        return "met" if met else "**MISS**"
    return "met, within noise" if met else "**MISS**, within noise"


@dataclasses.dataclass
class TargetCheck:
    """One target of one benchmark in one run: measured is None where the run lacks the baseline."""
    issue: str
    group: str
    impl: str
    want: str
    meets: Callable[[float], bool]
    measured: Optional[float]
    low: Optional[float] = None
    high: Optional[float] = None

    @property
    def key(self):
        return self.issue, self.group, self.impl, self.want

    def status(self) -> str:
        if self.measured is None:
            return "no baseline in run"
        return verdict(self.meets(self.measured), (self.meets(self.low), self.meets(self.high)))


def target_test(t: dict):
    """A target (``Target.as_dict()``) as its text and its test of a measured figure."""
    if t["vs"] == "floor":
        return f"≤ {t['max_floor_ratio']:g}× memory floor", lambda x: x <= t["max_floor_ratio"]
    return f"≥ {t['min_speedup']:g}× {t['vs']}", lambda x: x >= t["min_speedup"]


def target_checks(run: Run) -> list:
    checks = []
    for b in run.benchmarks:
        for t in b["extra_info"].get("targets", []):
            if t["vs"] == "floor":
                measured, baseline = b["extra_info"].get("floor_ratio"), None
            else:
                measured, baseline = run.speedup(b, t["vs"]), run.by_group[b["group"]].get(t["vs"])
            want, meets = target_test(t)
            check = TargetCheck(str(t.get("issue", "")), b["group"], b["extra_info"]["impl"], want, meets, measured)
            if measured is not None:
                check.low, check.high = quartile_range(b, baseline, measured)
            checks.append(check)
    return checks


def targets_section(run: Run) -> list:
    checks = target_checks(run)
    if not checks:
        return []
    statuses = [c.status() for c in checks]
    met = sum(s.startswith("met") for s in statuses)
    unclear = sum(s.endswith("within noise") for s in statuses)
    lines = ["", f"## Targets ({met} of {len(checks)} met; {unclear} within noise of their line)", "",
             "A target is within noise where the quartile range (the measured figure recomputed from the "
             "interquartile ranges of the benchmarks behind it) has the target inside: this run cannot tell it "
             "from the line.", "",
             "| issue | benchmark | ours | target | measured | quartile range | |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c, status in zip(checks, statuses):
        spread = "—" if c.measured is None else f"{c.low:.2f}-{c.high:.2f}×"
        lines.append(f"| {c.issue} | {c.group} | {c.impl} | {c.want} | {fmt_ratio(c.measured)} | {spread} | {status} |")
    return lines


def targets_across_runs(runs: list) -> list:
    """Each target's figure in every run and their median, the verdict taken on the median: on a shared host a
    run can lose a CPU for a whole benchmark, which a single run's verdict cannot tell from a slow kernel."""
    by_key = {}
    for i, run in enumerate(runs):
        for c in target_checks(run):
            by_key.setdefault(c.key, [None] * len(runs))[i] = c
    lines = ["", f"## Targets over {len(runs)} runs", "",
             "The median of the runs' figures decides; \"runs disagree\" where some runs meet the target and "
             "others miss it.", "",
             "| issue | benchmark | ours | target | " + " | ".join(f"run {i + 1}" for i in range(len(runs)))
             + " | median | |", "| --- | --- | --- | --- | " + " | ".join("---" for _ in runs) + " | --- | --- |"]
    met = disagree = 0
    for key, checks in by_key.items():
        figures = [c.measured for c in checks if c is not None and c.measured is not None]
        meets = next(c.meets for c in checks if c is not None)
        median = statistics.median(figures) if figures else None
        if median is None:
            status = "no baseline in any run"
        else:
            status = "met" if meets(median) else "**MISS**"
            met += meets(median)
            if len({meets(f) for f in figures}) > 1:
                status += ", runs disagree"
                disagree += 1
        cells = [fmt_ratio(c.measured if c is not None else None) for c in checks]
        lines.append(f"| {' | '.join(key)} | {' | '.join(cells)} | {fmt_ratio(median)} | {status} |")
    lines[1] += f" ({met} of {len(by_key)} met on the median; the runs disagree on {disagree})"
    return lines


def sort_key(b, impl_order):
    info = b["extra_info"]
    return (info.get("shape", ""), info.get("M", info.get("batch", 0)), impl_order[info["impl"]])


def kind_section(run: Run, kind: str) -> list:
    benches = run.of_kind(kind)
    impl_order = {impl: i for i, impl in enumerate(dict.fromkeys(b["extra_info"]["impl"] for b in benches))}
    baselines = [impl for impl in impl_order if not any(
        b["extra_info"]["ours"] for b in benches if b["extra_info"]["impl"] == impl)]
    shape_order = {s: i for i, s in enumerate(dict.fromkeys(b["extra_info"].get("shape", "") for b in benches))}
    ours = sorted((b for b in benches if b["extra_info"]["ours"]),
                  key=lambda b: (shape_order[b["extra_info"].get("shape", "")],) + sort_key(b, impl_order)[1:])
    if not ours:
        return []
    size_col = "M" if kind == "linear" else "batch"
    lines = ["", f"## {KIND_TITLES.get(kind, kind)}", "",
             f"| shape | {size_col} | ours | median | × floor | " + " | ".join(f"vs {b}" for b in baselines) + " |",
             "| --- | ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in baselines) + " |"]
    warm_seen = False
    for b in ours:
        info = b["extra_info"]
        cells = []
        for base in baselines:
            cell = fmt_ratio(run.speedup(b, base))
            if is_warm(b) or is_warm(run.by_group[b["group"]].get(base)):
                cell += " †"
                warm_seen = True
            cells.append(cell)
        floor = info.get("floor_ratio")
        lines.append(
            f"| {info.get('shape', b['group'])} | {info.get('M', info.get('batch', ''))} | {info['impl']} | "
            f"{fmt_time(b['stats']['median'])} | {'—' if floor is None else f'{floor:.2f}'} | {' | '.join(cells)} |"
        )
    if warm_seen:
        lines += ["", "† one side's weight copies could not all be built in time (torch.ao prepacking is slow), so "
                  "its weights were partly cache-resident: the ratio flatters that side."]
    return lines


def markdown(run: Run) -> str:
    lines = header(run) + targets_section(run)
    for kind in run.kinds():
        lines += kind_section(run, kind)
    return "\n".join(lines) + "\n"


def plot(run: Run, path: pathlib.Path) -> bool:
    """Linear speedup against M: over fp32 F.linear (top) and over the fastest torch kernel (bottom)."""
    benches = run.of_kind("linear")
    if not benches:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(b["extra_info"]["shape"] for b in benches))
    ms = sorted({b["extra_info"]["M"] for b in benches})
    impls = list(dict.fromkeys(b["extra_info"]["impl"] for b in benches if b["extra_info"]["ours"]))
    colors = {impl: plt.cm.tab10(i) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(2, len(shapes), figsize=(max(4.2 * len(shapes), 10), 8), squeeze=False, sharex=True)
    for col, shape in enumerate(shapes):
        for row in range(2):
            ax = axes[row][col]
            for impl in impls:
                points = []
                for b in benches:
                    info = b["extra_info"]
                    if info["shape"] != shape or info["impl"] != impl:
                        continue
                    if row == 0:
                        s = run.speedup(b, LINEAR_FLOAT_BASELINE)
                    else:
                        rivals = [run.median(b["group"], other) for other, ob in run.by_group[b["group"]].items()
                                  if not ob["extra_info"]["ours"]]
                        s = min(rivals) / b["stats"]["median"] if rivals else None
                    if s is not None:
                        points.append((info["M"], s))
                if points:
                    points.sort()
                    ax.plot(*zip(*points), marker="o", color=colors[impl], label=impl)
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}×"))
            ax.set_xticks(ms, [str(m) for m in ms])
            ax.minorticks_off()
            ax.grid(True, which="major", alpha=0.3)
            if row == 0:
                ax.set_title(f"N×K = {shape}")
            else:
                ax.set_xlabel("M (rows of the activation)")
        axes[0][0].set_ylabel(f"speedup over {LINEAR_FLOAT_BASELINE}")
        axes[1][0].set_ylabel("speedup over the fastest torch kernel")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    cpu = run.facts.get("cpu_model", "")
    fig.suptitle(f"quantkernels linear speedup — {cpu}, {run.facts.get('torch_threads', '?')} threads")
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=pathlib.Path, nargs="+",
                        help="pytest-benchmark output (--benchmark-json); several runs: their targets side by side, "
                             "then each run's report")
    parser.add_argument("--markdown", type=pathlib.Path, help="where to write the table (default: JSON's .md)")
    parser.add_argument("--plot", type=pathlib.Path, help="where to write the plot (default: JSON's .png)")
    args = parser.parse_args(argv)
    runs = []
    for path in args.json:
        runs.append(Run(json.loads(path.read_text())))
        if not runs[-1].benchmarks:
            parser.error(f"{path}: no quantkernels benchmarks with timings (was it run with --benchmark-disable?)")
    md_path = args.markdown or args.json[-1].with_suffix(".md")
    png_path = args.plot or args.json[-1].with_suffix(".png")
    if len(runs) == 1:
        text = markdown(runs[0])
    else:
        text = "\n".join(["# quantkernels benchmark report: several runs"] + targets_across_runs(runs)) + "\n"
        for i, run in enumerate(runs, 1):
            text += f"\n# Run {i}: {args.json[i - 1].name}\n\n" + markdown(run).split("\n", 2)[2]
    plotted = plot(runs[-1], png_path)
    if plotted:
        text += f"\n![linear speedup against M]({png_path.name})\n"
    md_path.write_text(text)
    print(text)
    print(f"wrote {md_path}" + (f" and {png_path}" if plotted else ""))


if __name__ == "__main__":
    main()
