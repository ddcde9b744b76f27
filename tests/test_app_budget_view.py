"""The Budget instrument, the end-of-job table, the Fine-tune form and the phase line: plain functions on
hand-made data and on a real calibration of the default (small-cnn-digits on digits-5to9)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from engine.calibration import DEFAULT_EPS_GRID, calibrate
from engine.calibration.plan import solve_plan
from lance_app import budget_view, finetune_form, finetune_view
from lance_app.axes import METHOD_COLOURS, MODE_COLOURS
from lance_app.figures import format_bytes, metrics_frame
from lance_app.form_store import form_path, like_default, load_form, save_form
from lance_app.live import phase_line
from lance_app.state import METHODS
from lance_app.summary_table import summary_frame, vanilla_reference


def _layers(*options):
    return [{"name": f"l{i}", "options": [{"bytes": b, "perplexity": p} for b, p in opts]}
            for i, opts in enumerate(options)]


def test_exact_front_equals_brute_force_on_hand_made_options():
    layers = _layers([(10, 5.0), (30, 1.0), (100, 0.0)], [(5, 2.0), (8, 2.5), (20, 0.5), (50, 0.0)],
                     [(1, 9.0), (40, 0.1)])
    fb, fp = budget_view.exact_front(layers)
    combos = [(sum(b for b, _ in c), sum(p for _, p in c))
              for c in itertools.product(*[[(o["bytes"], o["perplexity"]) for o in la["options"]] for la in layers])]
    for budget in range(0, 200):  # the staircase: least Σ perplexity within every budget
        fits = [p for b, p in combos if b <= budget]
        expected = min(fits) if fits else None
        got = budget_view.front_value(fb, fp, budget)
        assert (got is None and expected is None) or got == pytest.approx(expected), budget
    assert list(fb) == sorted(set(fb)) and all(a > b for a, b in zip(fp, fp[1:]))  # corners only
    assert fb[0] == 16 and fp[-1] == pytest.approx(0.1) and fb[-1] == 190  # cheapest total; least Σ at the top


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    import os

    os.environ["LANCE_HOME"] = str(tmp_path_factory.mktemp("calib"))
    return calibrate("small-cnn-digits", weights="bundled", dataset="digits-5to9", layers_k=4,
                     eps_grid=list(DEFAULT_EPS_GRID), batches=2, batch_size=64, seed=0).to_dict()


@pytest.mark.parametrize("batch_size", [64, 24])
def test_front_corners_are_the_knapsack_optimum_at_the_training_batch_size(calibration, batch_size):
    options = budget_view.layer_options(calibration, batch_size)
    assert [o["shape"][0] for o in options] == [batch_size] * 4
    fb, fp = budget_view.exact_front(options)
    assert fb[-1] == sum(o["full_bytes"] for o in options) and fp[-1] == 0.0  # the top corner: vanilla, exact
    for i in np.linspace(0, len(fb) - 1, 25).astype(int):  # corners and the budget just below each
        plan = solve_plan(calibration, int(fb[i]), batch_size)
        assert sum(layer.perplexity for layer in plan.per_layer) == pytest.approx(fp[i], rel=1e-9)
        assert plan.plan_total_bytes <= fb[i]
        if i:
            below = solve_plan(calibration, int(fb[i]) - 1, batch_size)
            assert sum(layer.perplexity for layer in below.per_layer) == pytest.approx(fp[i - 1], rel=1e-9)
    with pytest.raises(ValueError, match="least total that fits is"):
        solve_plan(calibration, int(fb[0]) - 1, batch_size)


def test_budget_grid_is_log_spaced_over_the_feasible_range_and_snap_is_nearest_in_log():
    grid = budget_view.budget_grid(6_180, 7_340_032, n=121)
    assert grid[0] == 6_180 and grid[-1] == 7_340_032 and len(grid) == 121
    ratios = np.diff(np.log(grid))
    assert ratios.max() < 1.01 * ratios.min() + 1e-4  # evenly spaced in log
    assert budget_view.snap(grid, 1) == 6_180 and budget_view.snap(grid, 10**9) == 7_340_032
    assert budget_view.snap(grid, grid[40] + 1) == grid[40]
    assert budget_view.budget_grid(5, 5) == [5]


def test_layer_bars_start_at_a_stated_log_baseline_and_reach_the_bytes():
    fig = budget_view.layer_bars_figure(["a", "b"], [3_524, 77_648], [262_144, 4_194_304])
    assert budget_view.log_baseline([3_524, 77_648, 262_144]) == 1_000.0
    for trace, values in zip(fig.data, ([3_524, 77_648], [262_144, 4_194_304])):
        assert trace.base == 1_000.0
        assert [b + y for b, y in zip([trace.base] * 2, trace.y)] == [float(v) for v in values]
        assert list(trace.text) == [format_bytes(v) for v in values]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.range[0] == pytest.approx(3.0)
    assert "bars start at 1000 B" in fig.layout.yaxis.title.text


def test_front_figure_marks_the_plan_and_the_budget():
    fig = budget_view.front_figure(np.array([10, 20, 40]), np.array([3.0, 1.0, 0.0]), chosen_bytes=20,
                                   chosen_perplexity=1.0, budget_bytes=30, vanilla_bytes=40)
    assert list(fig.data[0].x) == [10, 20, 40] and fig.data[0].line.shape == "hv"
    assert list(fig.data[1].x) == [20] and list(fig.data[1].y) == [1.0]
    assert [s.x0 for s in fig.layout.shapes] == [30, 40] and fig.layout.xaxis.type == "log"


def test_rank_table_names_modes_and_gives_factors(calibration):
    plan = solve_plan(calibration, "64KiB", 32)
    table = budget_view.rank_table(plan)
    assert list(table.columns[:6]) == ["layer", "ε", "B", "C", "H", "W"]
    assert table.loc[3, "layer"] == "classifier" and math.isnan(table.loc[3, "H"])  # a linear layer: B, F
    assert "F" in table.columns and table.loc[3, "B"] == plan.per_layer[3].ranks["asi"][0]
    assert table["bytes"].sum() == plan.plan_total_bytes
    assert table.loc[0, "× smaller"] == round(plan.per_layer[0].full_bytes / plan.per_layer[0].bytes["asi"], 1)


# -- end-of-job table ------------------------------------------------------------------------------
def _run(rid, method, layer, region, acc=(80.0, 82.0), config=None, status="completed", job="j", created="1"):
    return {"id": rid, "method": method, "status": status, "job_id": job, "created_at": created,
            "config": config or {"backbone": "b", "dataset": "d", "layers": 4, "batch_size": 64},
            "summary": {"val_acc": acc[0], "best_val_acc": acc[1], "layer_activation_bytes": layer,
                        "region_activation_bytes": region, "step_ms": 12.345, "flops": 2.5e9, "epochs_done": 3}}


def test_summary_table_compares_each_method_with_the_jobs_vanilla():
    runs = [_run("v", "vanilla", 1_000_000, 2_000_000, acc=(90.0, 91.5)), _run("a", "asi", 10_000, 500_000)]
    table, ref = summary_frame(runs)
    assert ref["id"] == "v"
    row = table.set_index("method").loc["asi"]
    assert row["× vs vanilla (layer)"] == 100.0 and row["× vs vanilla (region)"] == 4.0
    assert row["layer bytes"] == format_bytes(10_000) and row["median step ms"] == 12.3
    assert row["MFLOP/step"] == 2500.0 and row["final acc %"] == 80.0 and row["best acc %"] == 82.0
    assert table.set_index("method").loc["vanilla", "best acc %"] == 91.5


def test_summary_table_finds_a_stored_vanilla_of_the_same_setup_only():
    job = [_run("a", "asi", 10_000, 500_000)]
    other = _run("v2", "vanilla", 2_000_000, 4_000_000, config={"backbone": "b", "dataset": "d", "layers": 4,
                                                                "batch_size": 32}, job="old", created="3")
    same_old = _run("v1", "vanilla", 1_000_000, 2_000_000, job="old", created="1")
    same_new = _run("v3", "vanilla", 1_500_000, 2_000_000, job="old", created="2")
    assert vanilla_reference(job, [other, same_old, same_new])["id"] == "v3"  # newest of the same setup
    table, ref = summary_frame(job, [other])
    assert ref is None and table["× vs vanilla (layer)"].isna().all()


# -- form ------------------------------------------------------------------------------------------
def test_form_check_names_the_field_and_what_to_write():
    good = dict(finetune_form.DEFAULTS)
    assert finetune_form.check_form(good).ok
    bad = finetune_form.check_form({**good, "ft_epochs": 0, "ft_lr": -1.0, "ft_batch": 2.5, "ft_eps_lance": 1.5,
                                    "ft_limit_val": -3, "ft_methods": []})
    assert set(bad.errors) == {"ft_epochs", "ft_lr", "ft_batch", "ft_eps_lance", "ft_limit_val", "ft_methods"}
    assert bad.errors["ft_epochs"] == "Epochs: got 0; write a whole number from 1 to 1000."
    assert bad.errors["ft_eps_lance"].startswith("LANCE ε: got 1.5; write a number in (0, 1]")
    d = finetune_form.DEFAULTS  # stored values come back in the widget's type (seed_session's rule)
    assert like_default(d["ft_epochs"], "3") == 3 and like_default(d["ft_lr"], 1) == 1.0
    assert like_default(d["ft_methods"], ["asi", "nope"], METHODS) == ["asi"]
    assert like_default(d["ft_epochs"], "x") == 1


def test_finetune_args_with_a_plan_leave_batch_and_lance_eps_to_it():
    cfg = {"backbone": "small-cnn-digits", "weights": "bundled", "dataset": "digits-5to9", "layers": 4, "seed": 0}
    values = {**finetune_form.DEFAULTS, "ft_methods": ["hosvd", "lance"], "ft_limit_val": 50}
    args = finetune_form.finetune_args(cfg, values, plan_args=["--ranks", "P.json", "--batch-size", "16"])
    assert args.count("--batch-size") == 1 and args[args.index("--batch-size") + 1] == "16"
    assert args[args.index("--eps") + 1] == "hosvd=0.8" and args[args.index("--limit-val") + 1] == "50"
    plain = finetune_form.finetune_args(cfg, values)
    assert plain[plain.index("--eps") + 1] == "hosvd=0.8,lance=0.95" and "--ranks" not in plain


def test_form_store_round_trip_and_unreadable_file(tmp_path):
    assert load_form("finetune", tmp_path) == {}
    assert save_form("finetune", {"ft_epochs": 3}, tmp_path) is True
    assert save_form("finetune", {"ft_epochs": 3}, tmp_path) is False  # unchanged: not rewritten
    assert load_form("finetune", tmp_path) == {"ft_epochs": 3}
    form_path("finetune", tmp_path).write_text("{not json")
    assert load_form("finetune", tmp_path) == {}
    with pytest.raises(ValueError, match="form name"):
        form_path("../x", tmp_path)


# -- phase line, live charts -----------------------------------------------------------------------
def test_phase_line_text_and_fraction():
    assert phase_line(None) is None
    text, frac = phase_line({"phase": "caching", "done": 1_250, "total": 5_000, "updated_at": 100.0}, now=103.4)
    assert text == "Caching frozen features · 1,250/5,000 (25%) · updated 3 s ago" and frac == 0.25
    assert phase_line({"phase": "calibrating", "done": None, "total": None}) == ("Calibrating…", None)
    assert phase_line({"phase": "training", "done": 7, "total": None})[0] == "Training · 7"


MCUNET_LAYERS = ["blocks.14.mobile_inverted_conv.point_linear.conv", "blocks.15.mobile_inverted_conv.depth_conv.conv",
                 "blocks.16.mobile_inverted_conv.inverted_bottleneck.conv"]


def _job_frame(ranked: dict[str, list[str]]):
    """Rows of a two-run job (vanilla #r1, asi #r2 …): loss, train acc, one val acc per run; ranks of the
    runs in ``ranked`` (label -> layers, four modes '0'..'3' each, value 3 + mode)."""
    import pandas as pd

    frames = []
    for n, label in enumerate(["vanilla #r1", *ranked]):
        part = [{"step": s, "epoch": 0, "split": "train", "key": "loss", "value": 1.0 / s} for s in (1, 2)]
        part += [{"step": 2, "epoch": 0, "split": "val", "key": "acc", "value": 50.0 + n}]
        part += [{"step": 1, "epoch": 0, "split": "train", "key": "acc", "value": 40.0 + n}]
        part += [{"step": s, "epoch": 0, "split": "train", "key": f"rank/{layer}/{m}", "value": 3 + m}
                 for layer in ranked.get(label, []) for m in range(4) for s in (1, 2)]
        frames.append(metrics_frame(part, label=label, run_id=f"r{n + 1}"))
    return pd.concat(frames, ignore_index=True)


def test_live_charts_use_the_method_colours_shared_markers_and_ranks_and_wait_without_rows():
    figs = dict(finetune_view.build_figures(_job_frame({"asi #r2": ["conv"]})))
    acc = {t.name: t for t in figs["ft_acc"].data}
    assert set(acc) == {"vanilla #r1", "asi #r2", "vanilla #r1 (val)", "asi #r2 (val)"}
    assert acc["asi #r2 (val)"].marker.color == acc["asi #r2"].line.color == METHOD_COLOURS["asi"]
    assert acc["vanilla #r1 (val)"].marker.color == acc["vanilla #r1"].line.color == METHOD_COLOURS["vanilla"]
    assert list(acc["asi #r2 (val)"].y) == [51.0] and list(acc["asi #r2 (val)"].x) == [2]
    assert acc["asi #r2 (val)"].marker.symbol == "diamond"
    assert figs["ft_loss"].data[1].line.color == METHOD_COLOURS["asi"]  # one colour per method in every chart
    ranks = figs["ft_ranks"]
    assert [t.name for t in ranks.data] == ["B", "C", "H", "W"]  # as the Spectra page names a conv input's modes
    assert [list(t.y) for t in ranks.data] == [[3, 3], [4, 4], [5, 5], [6, 6]]
    assert [t.line.color for t in ranks.data] == [MODE_COLOURS[m] for m in "BCHW"]
    empty = dict(finetune_view.build_figures(metrics_frame([])))
    assert all(len(f.data) == 0 and f.layout.annotations[0].text == finetune_view.WAITING for f in empty.values())
    assert empty["ft_loss"].layout.title.text == "training loss" and empty["ft_loss"].layout.xaxis.visible is False
    done = dict(finetune_view.build_figures(metrics_frame([]), finished=True))
    assert done["ft_ranks"].layout.annotations[0].text == "nothing logged for this chart"


def test_ranks_legend_on_mcunet_with_two_runs_is_the_four_modes():
    ranks = dict(finetune_view.build_figures(_job_frame({"asi #r2": MCUNET_LAYERS,
                                                         "lance #r3": MCUNET_LAYERS})))["ft_ranks"]
    assert len(ranks.data) == 2 * 3 * 4  # every (run, layer, mode) drawn
    assert [t.name for t in ranks.data if t.showlegend is not False] == ["B", "C", "H", "W"]
    assert ranks.layout.legend.title.text == "mode (line: asi solid, lance dash)"
    assert {t.line.dash for t in ranks.data if "lance" in t.hovertemplate} == {"dash"}
    assert {t.line.dash for t in ranks.data if "asi" in t.hovertemplate} == {"solid"}
    assert [a.text for a in ranks.layout.annotations] == ["14.point_linear", "15.depth_conv",
                                                          "16.inverted_bottleneck"]
