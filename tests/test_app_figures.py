"""Figure builders and tables of the app, on data built by hand: the traces carry the right values."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from engine.store import RunStore
from lance_app import axes, continual_view, figures, sweep_view
from lance_app.runs_table import config_side_by_side, metrics_export, runs_frame


def _rows(values, key="loss", split="train", start_id=1):
    return [{"id": start_id + i, "step": i, "epoch": 0, "split": split, "task": None, "key": key,
             "value": v} for i, v in enumerate(values)]


def test_metric_figure_one_line_per_run_in_step_order():
    df = figures.metrics_frame(list(reversed(_rows([3.0, 2.0, 1.0]))), label="vanilla #a", run_id="a")
    df2 = figures.metrics_frame(_rows([4.0, 1.5]) + _rows([50.0], key="acc"), label="asi #b", run_id="b")
    import pandas as pd
    fig = figures.metric_figure(pd.concat([df, df2]), "loss", split="train")
    assert [t.name for t in fig.data] == ["vanilla #a", "asi #b"]
    assert list(fig.data[0].x) == [0, 1, 2] and list(fig.data[0].y) == [3.0, 2.0, 1.0]
    assert list(fig.data[1].y) == [4.0, 1.5]
    assert figures.metric_figure(df2, "loss", split="val").data == ()
    assert figures.latest_value(df2, "acc") == 50.0
    assert figures.latest_value(df2, "missing") is None


def test_prefixed_figure_names_layers_by_their_short_names():
    rows = (_rows([0.8, 0.9], key="captured_energy/blocks.3.conv")
            + _rows([0.5, 0.6], key="captured_energy/blocks.4.conv", start_id=9))
    fig = figures.prefixed_metric_figure(figures.metrics_frame(rows, label="hosvd #x"), "captured_energy/")
    by_name = {t.name: list(t.y) for t in fig.data}
    assert by_name == {"3": [0.8, 0.9], "4": [0.5, 0.6]}  # 'blocks' and 'conv' are shared by both


MCUNET = ["blocks.14.mobile_inverted_conv.point_linear.conv", "blocks.15.mobile_inverted_conv.depth_conv.conv",
          "blocks.16.mobile_inverted_conv.inverted_bottleneck.conv"]


def test_ranks_figure_one_panel_per_layer_modes_named_bchw_legend_once():
    rows, start = [], 1
    for li, layer in enumerate(MCUNET):
        for mode in range(4):
            rows += _rows([10 * li + mode + 1, 10 * li + mode + 2], key=f"rank/{layer}/{mode}", start_id=start)
            start += 2
    fig = figures.ranks_figure(figures.metrics_frame(rows, label="hosvd #x"))
    assert [a.text for a in fig.layout.annotations] == ["14.point_linear", "15.depth_conv",
                                                        "16.inverted_bottleneck"]
    assert len(fig.data) == 12
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert legend == ["B", "C", "H", "W"]  # the modes once, not 12 layer/mode names
    w16 = next(t for t in fig.data if t.name == "W" and t.xaxis == "x3")
    assert list(w16.y) == [24, 25] and w16.line.color == fig.data[3].line.color  # W: one colour everywhere
    assert fig.layout.yaxis.type == "log" and list(fig.layout.yaxis.ticktext) == ["1", "2", "5", "10", "20",
                                                                                  "50", "100"]
    two = figures.ranks_figure(figures.metrics_frame(_rows([3, 4], key="rank/fc/0") + _rows(
        [5, 6], key="rank/fc/1", start_id=5), label="lance #y"))
    assert [t.name for t in two.data] == ["B", "F"]  # a linear input: (B, F)


def test_log_ticks_powers_of_ten_without_minor_digits():
    ticks, text = axes.log_ticks([300, 2e6], "B")
    assert ticks == [100, 1e3, 1e4, 1e5, 1e6, 1e7]
    assert text == ["100 B", "1 kB", "10 kB", "100 kB", "1 MB", "10 MB"]
    assert axes.log_ticks([1.5e3, 9e4])[1] == ["1e3", "2e3", "5e3", "1e4", "2e4", "5e4", "1e5"]
    assert axes.log_ticks([None, 0, float("nan")]) == ([], [])


def test_one_colour_per_method_in_every_chart():
    import pandas as pd

    a = figures.metrics_frame(_rows([2.0, 1.0]) + _rows([100.0, 90.0], key="layer_activation_bytes", start_id=5)
                              + [{"id": 20, "step": 1, "epoch": 0, "split": "val", "task": None, "key": "acc",
                                  "value": 61.0}] + _rows([40.0, 50.0], key="acc", start_id=30),
                              label="asi #a", run_id="a")
    b = figures.metrics_frame(_rows([2.5, 1.5]) + _rows([4e3, 4e3], key="layer_activation_bytes", start_id=5),
                              label="lance #b", run_id="b")
    df = pd.concat([a, b])
    loss = figures.metric_figure(df, "loss", split="train")
    memory = figures.memory_figure(df)
    acc = figures.add_val_markers(figures.metric_figure(df, "acc", split="train"), df)
    results = {"sweep": {"x_metric": "peak_layer_activation_bytes"}, "front": {"asi": ["k"]}, "configurations": [
        {"method": "asi", "config_key": "k", "label": "asi", "seeds": [0], "on_front": True,
         "metrics": {"peak_layer_activation_bytes": {"mean": 100.0, "std": 0.0}, "accuracy": {"mean": 60.0,
                                                                                             "std": 1.0}}}]}
    front = sweep_view.front_figure(results)
    asi = axes.METHOD_COLOURS["asi"]
    assert loss.data[0].line.color == memory.data[0].line.color == front.data[0].marker.color == asi
    assert loss.data[1].line.color == memory.data[1].line.color == axes.METHOD_COLOURS["lance"] != asi
    val = [t for t in acc.data if t.name == "asi #a (val)"]
    assert len(val) == 1 and val[0].marker.color == asi and list(val[0].y) == [61.0]  # the method's colour
    assert memory.layout.yaxis.ticktext[0] == "10 B" and "minor" in memory.layout.yaxis.to_plotly_json()
    second = figures.metric_figure(pd.concat([a, figures.metrics_frame(_rows([3.0]), label="asi #c")]), "loss")
    assert [t.line.dash for t in second.data] == ["solid", "dash"]  # a second asi run: same colour, dashed


def test_task_axes_have_whole_number_ticks():
    rows = [{"id": i, "step": i, "epoch": None, "split": "task", "task": i, "key": "ACC", "value": 90.0 - i}
            for i in range(5)]
    fig = figures.metric_figure(figures.metrics_frame(rows, label="gpm #g"), "ACC", split="task", x="task")
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tickformat == "d"
    assert figures.is_empty(figures.metric_figure(figures.metrics_frame([]), "ACC"))
    assert not figures.is_empty(fig)


def test_energy_figure_normalised_and_cumulative():
    s = [3.0, 1.0, 0.0]  # energies 9, 1, 0 of 10
    e = figures.normalised_energy(s)
    assert np.allclose(e, [0.9, 0.1, 0.0])
    fig = figures.energy_figure({"C": e}, cumulative=False)
    assert np.allclose(fig.data[0].y, [0.9, 0.1, 0.0]) and list(fig.data[0].x) == [1, 2, 3]
    cum = figures.energy_figure({"C": e, "H": [0.5, 0.5]}, cumulative=True, eps_marks=[0.8])
    assert np.allclose(cum.data[0].y, [0.9, 1.0, 1.0]) and np.allclose(cum.data[1].y, [0.5, 1.0])
    assert len(cum.layout.shapes) == 1 and cum.layout.shapes[0].y0 == 0.8
    assert [a.text for a in cum.layout.annotations] == ["ε 0.8"]  # the dashed line says which ε it is
    assert cum.layout.shapes[0].line.dash == "dash"
    assert [t.line.color for t in cum.data] == [axes.MODE_COLOURS["C"], axes.MODE_COLOURS["H"]]
    assert not hasattr(figures, "rank_for_energy")  # ranks come from the engine's one rule (engine.spectra)


def test_heatmap_and_perplexity_shapes():
    fig = figures.eps_heatmap_figure(["a", "b"], [0.5, 0.9], [[1, 2], [3, 4]], "ranks")
    assert fig.data[0].z == ((1.0, 2.0), (3.0, 4.0)) or np.allclose(fig.data[0].z, [[1, 2], [3, 4]])
    assert list(fig.data[0].x) == ["0.5", "0.9"] and list(fig.data[0].y) == ["a", "b"]
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        figures.eps_heatmap_figure(["a", "b"], [0.5, 0.9], [[1, 2, 3]], "bad")
    p = figures.perplexity_figure(["a"], [0.5, 0.9], [[0.3, 0.01]])
    assert p.layout.yaxis.type == "log" and list(p.data[0].y) == [0.3, 0.01]


def test_budget_bars():
    fig = figures.budget_bars_figure(["l1", "l2"], [100, 200], [1000, 4000], budget_bytes=300)
    assert list(fig.data[0].y) == [100.0, 200.0] and list(fig.data[1].y) == [1000.0, 4000.0]
    assert "budget 300 B" in fig.layout.annotations[0].text
    assert figures.format_bytes(1536) == "1.5 KiB" and figures.format_bytes(None) == "–"


def test_accuracy_matrix_from_task_rows():
    rows = []
    for i in range(3):
        for j in range(i + 1):
            rows.append({"step": None, "epoch": None, "split": "task", "task": i, "key": f"acc/{j}",
                         "value": 90.0 - 10 * (i - j)})
        rows.append({"step": None, "epoch": None, "split": "task", "task": i, "key": "usage/conv1",
                     "value": 0.1 * (i + 1)})
    df = figures.metrics_frame(rows, label="lance #1")
    m = figures.accuracy_matrix(df)
    assert m.shape == (3, 3)
    assert m[2, 0] == 70.0 and m[1, 1] == 90.0 and np.isnan(m[0, 1])
    fig = figures.accuracy_matrix_figure(m)
    assert fig.data[0].z[2][0] == 70.0 and fig.data[0].z[0][1] is None
    usage = figures.usage_figure(df)
    assert list(usage.data[0].x) == [0, 1, 2] and np.allclose(usage.data[0].y, [0.1, 0.2, 0.3])
    assert figures.accuracy_matrix(figures.metrics_frame([])).shape == (0, 0)


def test_runs_table_config_and_export():
    runs = [{"id": "r1", "kind": "finetune", "method": "asi", "status": "completed",
             "config": {"lr": 0.05, "model": {"name": "small-cnn"}, "layers": [1, 2]},
             "summary": {"val_acc": 91.5}, "created_at": 2.0},
            {"id": "r2", "kind": "finetune", "method": "vanilla", "status": "failed", "message": "NaN loss",
             "config": {"lr": 0.1, "model": {"name": "small-cnn"}}, "summary": None, "created_at": 1.0}]
    table = runs_frame(runs)
    assert table["val_acc"].tolist()[0] == 91.5 and "step_ms" not in table.columns
    assert table["message"].tolist() == ["", "NaN loss"]
    assert table["created_at"].tolist()[0] == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(2.0))
    side = config_side_by_side(runs)
    assert list(side.columns) == ["asi #r1", "vanilla #r2"]
    assert side.index[0] in ("lr", "layers")  # differing keys first
    assert side.loc["model.name"].tolist() == ["small-cnn", "small-cnn"]
    df = figures.metrics_frame(_rows([1.0, 0.5]), label="asi #r1", run_id="r1")
    csv_bytes, json_bytes = metrics_export(df, runs[:1])
    assert csv_bytes.decode().splitlines()[0].startswith("label,run_id,id,step")
    payload = json.loads(json_bytes)
    assert [m["value"] for m in payload["runs"][0]["metrics"]] == [1.0, 0.5]


def test_memory_figure_layer_region_and_peak_per_run_one_colour_each():
    import pandas as pd
    a = figures.metrics_frame(_rows([100.0, 100.0], key="layer_activation_bytes")
                              + _rows([900.0, 800.0], key="region_activation_bytes", start_id=10)
                              + _rows([5e4, 6e4], key="peak_memory_bytes", start_id=20), label="asi #a", run_id="a")
    b = figures.metrics_frame(_rows([4e3], key="layer_activation_bytes"), label="vanilla #b", run_id="b")
    fig = figures.memory_figure(pd.concat([a, b]))
    assert [t.name for t in fig.data] == ["asi #a · layer", "asi #a · region", "asi #a · step peak",
                                          "vanilla #b · layer"]
    assert [list(t.y) for t in fig.data] == [[100.0, 100.0], [900.0, 800.0], [5e4, 6e4], [4e3]]
    assert len({t.line.color for t in fig.data[:3]}) == 1 and fig.data[3].line.color != fig.data[0].line.color
    assert [t.line.dash for t in fig.data[:3]] == ["solid", "dash", "dot"]
    assert fig.layout.yaxis.type == "log"
    tasks = figures.metrics_frame([{"id": i, "step": None, "epoch": None, "split": "task", "task": i,
                                    "key": "peak_layer_activation_bytes", "value": v}
                                   for i, v in enumerate([7.0, 3.0])], label="lance #c", run_id="c")
    assert figures.run_peaks(tasks) == {"layer": 7.0, "region": None, "step peak": None}
    cl = figures.memory_figure(tasks, split="task", x="task", keys=figures.CONTINUAL_MEMORY_KEYS)
    assert [list(t.x) for t in cl.data] == [[0, 1]] and [list(t.y) for t in cl.data] == [[7.0, 3.0]]


def _task_rows(matrix, peaks):
    rows = []
    for i, row in enumerate(matrix):
        rows += [{"step": i, "epoch": None, "split": "task", "task": i, "key": f"acc/{j}", "value": v}
                 for j, v in enumerate(row)]
        rows += [{"step": i, "epoch": None, "split": "task", "task": i, "key": "ACC", "value": sum(row) / len(row)},
                 {"step": i, "epoch": None, "split": "task", "task": i, "key": "BWT",
                  "value": sum(row[j] - matrix[j][j] for j in range(i)) / max(1, i)},
                 {"step": i, "epoch": None, "split": "task", "task": i, "key": "peak_layer_activation_bytes",
                  "value": peaks[i]}]
    return rows


def test_continual_side_by_side_table_matrices_and_tasks():
    runs = [{"id": "r-lance1", "method": "lance", "status": "completed"},
            {"id": "r-gpm222", "method": "gpm", "status": "running"}]
    frames = {"r-lance1": figures.metrics_frame(_task_rows([[90.0], [80.0, 95.0], [70.0, 90.0, 96.0]],
                                                           [1000.0, 800.0, 700.0]), label="lance #lance1"),
              "r-gpm222": figures.metrics_frame(_task_rows([[92.0], [91.0, 97.0]], [12000.0, 12000.0]),
                                                label="gpm #gpm222")}
    table = continual_view.summary_frame(runs, frames, n_tasks=3)
    assert table["tasks done"].tolist() == ["3/3", "2/3"]
    assert table["ACC %"].tolist() == pytest.approx([(70 + 90 + 96) / 3, 94.0])
    assert table["BWT"].tolist() == pytest.approx([((70 - 90) + (90 - 95)) / 2, -1.0])
    assert table["peak layer bytes"].tolist() == [1000.0, 12000.0]  # the max over the tasks, not the last
    assert table["layer bytes vs largest"].tolist() == ["1/12.0×", "1×"]
    mats = continual_view.matrices_figure(runs, frames)
    assert [t.type for t in mats.data] == ["heatmap", "heatmap"] and mats.data[1].xaxis == "x2"  # one row
    assert mats.data[0].z[2] == (70.0, 90.0, 96.0) or list(mats.data[0].z[2]) == [70.0, 90.0, 96.0]
    assert list(mats.data[1].z[2]) == [None, None, None] and list(mats.data[1].z[1]) == [91.0, 97.0, None]
    assert [mats.data[0].zmin, mats.data[0].zmax] == [0, 100] and mats.data[0].showscale is False
    tasks = continual_view.tasks_figure(runs, frames)
    by_panel = {(t.legendgroup, t.xaxis): list(t.y) for t in tasks.data}
    assert by_panel[("lance #lance1", "x")] == pytest.approx([90.0, 87.5, 256 / 3])  # ACC after each task
    assert by_panel[("lance #lance1", "x2")] == [90.0, 80.0, 70.0]  # task 0 as tasks are learned
    assert by_panel[("gpm #gpm222", "x3")] == [97.0]
    assert {t.line.color for t in tasks.data if t.legendgroup == "gpm #gpm222"} == {axes.METHOD_COLOURS["gpm"]}
    assert tasks.layout.xaxis.dtick == 1


def test_runs_table_method_options_fallback_and_scatter(tmp_path):
    """Runs made in a real RunStore (SQLite under tmp_path) through its public API; the fallback reads the
    newest *validation* row of a run without a summary, and only for the columns its summary lacks."""
    from lance_app.runs_table import fallback_values, scatter_figure

    store = RunStore(tmp_path / "store")
    ids = {}

    def run(name, kind, method, status, config, summary=None, rows=()):
        ids[name] = store.create_run(kind=kind, method=method, config=config)
        store.log_metrics(ids[name], rows)
        if summary is not None:
            store.set_summary(ids[name], summary)
        store.set_status(ids[name], status)

    val = [{"step": s, "epoch": e, "split": "val", "key": "acc", "value": v}
           for s, e, v in ((4, 0, 55.0), (8, 1, 71.5))]
    train = [{"step": 9, "epoch": 1, "split": "train", "key": "acc", "value": 99.0}]  # newer, but not val
    run("ft-h", "finetune", "hosvd", "completed", {"method_options": {"method": "hosvd", "eps": 0.8}, "lr": 0.05},
        {"val_acc": 60.0, "layer_activation_bytes": 3e4}, rows=val)  # its summary wins over its rows
    run("ft-v", "finetune", "vanilla", "interrupted", {"method_options": {"method": "vanilla"}}, rows=val + train)
    run("cl-l", "continual", "lance", "completed",
        {"training": {"eps": 0.3, "eps_cl": 0.97, "lr": 0.01, "basis_samples": 125}},
        {"acc": 80.0, "bwt": -1.5, "peak_layer_activation_bytes": 2e5})
    run("cl-f", "continual", "finetune", "completed", {"training": {"eps": 0.3, "eps_cl": 0.97}},
        {"acc": 60.0, "bwt": -30.0, "peak_layer_activation_bytes": 2e6})
    run("cl-g", "continual", "gpm", "interrupted", {"training": {}}, rows=[
        {"task": t, "split": "task", "key": k, "value": v}
        for t, k, v in ((0, "ACC", 95.0), (0, "BWT", 0.0), (1, "ACC", 88.0), (1, "BWT", -4.0))])
    runs = store.list_runs()
    fallback = fallback_values(store, runs)
    assert fallback == {ids["ft-v"]: {"val_acc": 71.5}, ids["cl-g"]: {"ACC": 88.0, "BWT": -4.0}}
    table = runs_frame(runs, fallback).set_index("id")
    by = {name: table.loc[rid] for name, rid in ids.items()}
    assert by["ft-v"]["val_acc"] == 71.5  # an interrupted run: its newest val row, not None
    assert by["ft-h"]["val_acc"] == 60.0 and by["cl-g"]["ACC"] == 88.0 and by["cl-g"]["BWT"] == -4.0
    assert by["ft-h"]["options"] == "eps=0.8" and by["ft-v"]["options"] == ""
    assert by["cl-l"]["options"] == "eps=0.3, eps_cl=0.97"  # lance's own; lr is everyone's
    assert by["cl-f"]["options"] == ""
    assert by["cl-l"]["ACC"] == 80.0 and by["cl-f"]["BWT"] == -30.0
    assert by["cl-l"]["layer bytes"] == 2e5 and by["ft-h"]["layer bytes"] == 3e4
    fig, missing = scatter_figure(runs_frame(runs, fallback))
    points = {t.name: (list(t.x), list(t.y)) for t in fig.data}
    assert points == {"hosvd": ([3e4], [60.0]), "lance": ([2e5], [80.0]), "finetune": ([2e6], [60.0])}
    assert sorted(missing) == sorted([f"vanilla #{ids['ft-v'][-6:]}", f"gpm #{ids['cl-g'][-6:]}"])  # no bytes
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.ticktext[0] == "10 kB"
    assert {t.name: t.marker.color for t in fig.data}["lance"] == axes.METHOD_COLOURS["lance"]
