"""engine.bench's shared pieces for the benchmark scripts: interleaved timing and the parser."""
from __future__ import annotations

import time

import pytest

from engine.bench.output import bench_parser
from engine.bench.timing import interleaved_ms, pair_ms


def test_interleaved_ms_warms_up_then_alternates_and_reports_medians():
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.02)

    def fast():
        calls.append("fast")

    ms = interleaved_ms({"slow": slow, "fast": fast}, repeats=3, warmup=2)
    assert calls == ["slow", "fast"] * 5  # two untimed rounds, then three timed ones, one call of each per round
    assert list(ms) == ["slow", "fast"]
    assert 18.0 <= ms["slow"] < 200.0 and 0.0 <= ms["fast"] < ms["slow"]
    assert ms["slow"] == round(ms["slow"], 3)


def test_pair_ms_is_the_two_callable_case():
    calls = []
    a, b = pair_ms(lambda: calls.append("a"), lambda: (calls.append("b"), time.sleep(0.01)), repeats=2)
    assert calls == ["a", "b"] * 3  # one warm-up round
    assert 0.0 <= a < b and b >= 9.0


def test_bench_parser_has_json_and_optional_repeats():
    doc = "What the script measures.\n\nMore text."
    parser = bench_parser(doc, 15)
    assert parser.description == "What the script measures."
    args = parser.parse_args([])
    assert args.repeats == 15 and args.json is None
    assert parser.parse_args(["--repeats", "3", "--json", "out.json"]).repeats == 3
    bare = bench_parser(doc).parse_args(["--json", "x.json"])
    assert bare.json == "x.json" and not hasattr(bare, "repeats")
    with pytest.raises(SystemExit):
        bench_parser(doc).parse_args(["--repeats", "3"])
