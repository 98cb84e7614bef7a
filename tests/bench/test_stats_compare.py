"""The statistics and regression logic behind `make bench` / `make bench-compare` (nothing here is timed)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.common import ratios, record, replace_section, summarize
from bench.compare import compare, judge, main


def metric(lo: float, mid: float, hi: float, better: str = "higher") -> dict:
    return {"min": lo, "median": mid, "max": hi, "n": 3, "unit": "x", "better": better}


def test_summarize_gives_min_median_max_of_the_repeats():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.5, 10.0, 4)


def test_summarize_rejects_no_values_and_unknown_direction():
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError, match="better"):
        summarize([1.0], better="faster")


def test_ratios_pair_each_repeat_with_its_own_baseline():
    assert ratios([4.0, 9.0], [2.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError):
        ratios([1.0], [1.0, 2.0])


def test_a_drop_within_the_spread_is_not_a_regression():
    assert judge(metric(3.0, 4.0, 5.0), metric(3.5, 3.2, 3.9)) == "same"


def test_a_drop_beyond_the_spread_is_a_regression():
    assert judge(metric(3.9, 4.0, 4.1), metric(2.9, 3.0, 3.1)) == "regressed"
    assert judge(metric(2.9, 3.0, 3.1), metric(3.9, 4.0, 4.1)) == "improved"


def test_for_lower_is_better_metrics_a_rise_is_the_regression():
    assert judge(metric(0.9, 1.0, 1.1, "lower"), metric(1.9, 2.0, 2.1, "lower")) == "regressed"
    assert judge(metric(1.9, 2.0, 2.1, "lower"), metric(0.9, 1.0, 1.1, "lower")) == "improved"


def test_compare_lists_metrics_missing_from_either_run():
    old = {"benchmarks": {"b": {"metrics": {"x": metric(1, 1, 1), "gone": metric(1, 1, 1)}}}}
    new = {"benchmarks": {"b": {"metrics": {"x": metric(1, 1, 1), "added": metric(1, 1, 1)}}}}
    status = {v.name: v.status for v in compare(old, new)}
    assert status == {"b/x": "same", "b/gone": "only-old", "b/added": "only-new"}


def test_compare_command_exits_nonzero_on_a_regression(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({"benchmarks": {"batching": {"metrics": {"c16": metric(3.9, 4.0, 4.1)}}}}))
    new.write_text(json.dumps({"benchmarks": {"batching": {"metrics": {"c16": metric(1.9, 2.0, 2.1)}}}}))
    result = CliRunner().invoke(main, ["--baseline", str(old), "--new", str(new)])
    assert result.exit_code == 1
    assert "batching/c16" in result.output and "regressed" in result.output
    assert CliRunner().invoke(main, ["--baseline", str(old), "--new", str(old)]).exit_code == 0


def test_replace_section_keeps_other_sections():
    text = "# Benchmarks\n\n<!-- a:begin -->\nold a\n<!-- a:end -->\n\n<!-- b:begin -->\nb\n<!-- b:end -->\n"
    out = replace_section(text, "a", "new a")
    assert "new a" in out and "old a" not in out and "<!-- b:begin -->\nb\n<!-- b:end -->" in out
    assert replace_section(out, "c", "c body").rstrip().endswith("<!-- c:end -->")


def test_record_merges_into_results_json_and_markdown(tmp_path):
    results, md = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    info = {"cpu": "test cpu", "cores": 2, "date_utc": "2026-01-01 00:00"}
    record("one", command="cmd 1", info=info, metrics={"m": metric(1, 2, 3)}, markdown="| t |",
           results=results, benchmarks_md=md)
    record("two", command="cmd 2", info=info, metrics={}, markdown="| u |", results=results, benchmarks_md=md)
    data = json.loads(results.read_text())
    assert set(data["benchmarks"]) == {"one", "two"}
    assert data["benchmarks"]["one"]["metrics"]["m"]["median"] == 2
    text = md.read_text()
    assert "`cmd 1`" in text and "`cmd 2`" in text and "test cpu" in text


def test_flatness_compares_the_last_50_pieces_with_pieces_10_to_60():
    from bench.serving import Trace, flatness

    even = Trace(0.0, [0.01 * i for i in range(1, 201)])
    assert flatness(even) == pytest.approx(1.0)
    slowing = Trace(0.0, [0.01 * i for i in range(1, 101)] + [1.0 + 0.03 * i for i in range(1, 101)])
    assert flatness(slowing) == pytest.approx(3.0)
    # One late piece on a busy machine is not a trend: (49 x 10 ms + 100 ms) / (50 x 10 ms).
    one_late = Trace(0.0, [0.01 * i for i in range(1, 200)] + [1.99 + 0.1])
    assert flatness(one_late) == pytest.approx(1.18)
    with pytest.raises(ValueError):
        flatness(Trace(0.0, [0.1, 0.2]))


def test_aiperf_figures_are_found_where_the_export_nests_them():
    from bench.serving import aiperf_stat

    export = {"records": {"time_to_first_token": {"unit": "ms", "avg": 12.0, "p50": 10.0}},
              "request_throughput": {"unit": "requests/sec", "avg": 3.5}}
    assert aiperf_stat(export, "time_to_first_token", "p50") == 10.0
    assert aiperf_stat(export, "request_throughput", "avg") == 3.5
    with pytest.raises(KeyError):
        aiperf_stat(export, "inter_token_latency", "p50")


def test_synthetic_checkpoint_layers_track_the_requested_size():
    from bench.convert_memory import layers_for

    small, large = layers_for(0.5e9, 1024, 32000), layers_for(2e9, 1024, 32000)
    assert 1 <= small < large


@pytest.mark.parametrize("module", ["serving", "batching", "convert_memory", "training", "gpu", "compare"])
def test_every_benchmark_script_explains_its_options(module):
    import importlib

    result = CliRunner().invoke(importlib.import_module(f"bench.{module}").main, ["--help"])
    assert result.exit_code == 0, result.output
    assert "--out" in result.output or module == "compare"
