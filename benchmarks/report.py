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
import json
import pathlib
import statistics
from collections import defaultdict
from typing import Optional

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


def target_rows(run: Run) -> list:
    rows = []
    for b in run.benchmarks:
        for t in b["extra_info"].get("targets", []):
            where = b["group"]
            if t["vs"] == "floor":
                measured, baseline = b["extra_info"].get("floor_ratio"), None
                want = f"≤ {t['max_floor_ratio']:g}× memory floor"
                meets = lambda x, t=t: x <= t["max_floor_ratio"]
            else:
                measured, baseline = run.speedup(b, t["vs"]), run.by_group[b["group"]].get(t["vs"])
                want = f"≥ {t['min_speedup']:g}× {t['vs']}"
                meets = lambda x, t=t: x >= t["min_speedup"]
            if measured is None:
                rows.append((t.get("issue", ""), where, b["extra_info"]["impl"], want, "—", "—", "no baseline in run"))
                continue
            low, high = quartile_range(b, baseline, measured)
            status = verdict(meets(measured), (meets(low), meets(high)))
            rows.append((t.get("issue", ""), where, b["extra_info"]["impl"], want, fmt_ratio(measured),
                         f"{low:.2f}-{high:.2f}×", status))
    return rows


def targets_section(run: Run) -> list:
    rows = target_rows(run)
    if not rows:
        return []
    met = sum(r[-1].startswith("met") for r in rows)
    unclear = sum(r[-1].endswith("within noise") for r in rows)
    lines = ["", f"## Targets ({met} of {len(rows)} met; {unclear} within noise of their line)", "",
             "A target is within noise where the quartile range (the measured figure recomputed from the "
             "interquartile ranges of the benchmarks behind it) has the target inside: this run cannot tell it "
             "from the line.", "",
             "| issue | benchmark | ours | target | measured | quartile range | |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(str(c) for c in r)} |" for r in rows]
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
    parser.add_argument("json", type=pathlib.Path, help="pytest-benchmark output (--benchmark-json)")
    parser.add_argument("--markdown", type=pathlib.Path, help="where to write the table (default: JSON's .md)")
    parser.add_argument("--plot", type=pathlib.Path, help="where to write the plot (default: JSON's .png)")
    args = parser.parse_args(argv)
    run = Run(json.loads(args.json.read_text()))
    if not run.benchmarks:
        parser.error(f"{args.json}: no quantkernels benchmarks with timings (was it run with --benchmark-disable?)")
    md_path = args.markdown or args.json.with_suffix(".md")
    png_path = args.plot or args.json.with_suffix(".png")
    text = markdown(run)
    plotted = plot(run, png_path)
    if plotted:
        text += f"\n![linear speedup against M]({png_path.name})\n"
    md_path.write_text(text)
    print(text)
    print(f"wrote {md_path}" + (f" and {png_path}" if plotted else ""))


if __name__ == "__main__":
    main()
