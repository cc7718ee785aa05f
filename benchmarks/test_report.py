"""The report's target verdicts on a made-up run: met or missed by the medians, and "within noise" only where the
quartile range has the target inside."""

from benchmarks.report import Run, targets_across_runs, targets_section


def bench(group, impl, median, spread, targets=(), **extra):
    """A pytest-benchmark record with quartiles median * (1 -+ spread)."""
    stats = dict(median=median, q1=median * (1 - spread), q3=median * (1 + spread), iqr=2 * spread * median)
    return dict(group=group, stats=stats, extra_info=dict(impl=impl, ours=bool(targets), targets=list(targets),
                                                          **extra))


def verdicts(ours_median, spread, floor_ratio=None):
    speedup = dict(vs="base", min_speedup=3.0, issue=6)
    floor = dict(vs="floor", max_floor_ratio=1.3, issue=3)
    run = Run(dict(benchmarks=[
        bench("g", "base", 3.0, spread),
        bench("g", "ours", ours_median, spread, targets=[speedup, floor], floor_ratio=floor_ratio or 1.0),
    ]))
    rows = [line for line in targets_section(run) if line.startswith("| 6") or line.startswith("| 3")]
    return [row.split(" | ")[-1].rstrip(" |") for row in rows]


def test_clear_verdicts():
    # 3.0 / 0.8 = 3.75x, quartile range 3.0 * 0.99 / (0.8 * 1.01) = 3.68x up: met whatever the noise.
    assert verdicts(0.8, 0.01, floor_ratio=1.1) == ["met", "met"]
    # 3.0 / 1.2 = 2.5x, at most 2.55x: missed; 1.5x the floor, at least 1.485x: missed.
    assert verdicts(1.2, 0.01, floor_ratio=1.5) == ["**MISS**", "**MISS**"]


def test_verdicts_within_noise():
    # 3.0 / 0.97 = 3.09x, but 2.5x to 3.8x over the quartiles: the run cannot tell it from 3x.
    assert verdicts(0.97, 0.1, floor_ratio=1.25) == ["met, within noise", "met, within noise"]
    assert verdicts(1.03, 0.1, floor_ratio=1.35) == ["**MISS**, within noise", "**MISS**, within noise"]


def test_heading_counts():
    run = Run(dict(benchmarks=[
        bench("a", "base", 3.0, 0.1),
        bench("a", "ours", 0.97, 0.1, targets=[dict(vs="base", min_speedup=3.0, issue=6)]),
        bench("b", "base", 3.0, 0.01),
        bench("b", "ours", 0.8, 0.01, targets=[dict(vs="base", min_speedup=3.0, issue=6)]),
        bench("c", "ours", 0.8, 0.01, targets=[dict(vs="absent", min_speedup=1.0, issue=6)]),
    ]))
    lines = targets_section(run)
    assert lines[1] == "## Targets (2 of 3 met; 1 within noise of their line)"
    assert lines[-1].endswith("| — | — | no baseline in run |")


def test_targets_across_runs():
    def run(ours_median):
        return Run(dict(benchmarks=[
            bench("g", "base", 3.0, 0.01),
            bench("g", "ours", ours_median, 0.01, targets=[dict(vs="base", min_speedup=3.0, issue=6)]),
        ]))

    # 3.75x, 3.33x, 2.5x (a run that lost a CPU): met on the median 3.33x, and the runs disagree.
    lines = targets_across_runs([run(0.8), run(0.9), run(1.2)])
    assert lines[1] == "## Targets over 3 runs (1 of 1 met on the median; the runs disagree on 1)"
    assert lines[-1].endswith("| 3.75× | 3.33× | 2.50× | 3.33× | met, runs disagree |")
    # Two runs of three below the line: missed on the median.
    lines = targets_across_runs([run(0.8), run(1.1), run(1.2)])
    assert lines[1] == "## Targets over 3 runs (0 of 1 met on the median; the runs disagree on 1)"
    assert lines[-1].endswith("| 2.73× | **MISS**, runs disagree |")
