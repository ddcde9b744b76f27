"""Figure builders and tables of the app, on data built by hand: the traces carry the right values."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from lance_app import figures
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


def test_prefixed_figure_names_layers_and_modes():
    rows = _rows([4, 4], key="rank/blocks.3.conv/C") + _rows([2, 3], key="rank/blocks.3.conv/H", start_id=9)
    fig = figures.prefixed_metric_figure(figures.metrics_frame(rows, label="hosvd #x"), "rank/", split="train")
    assert sorted(t.name for t in fig.data) == ["blocks.3.conv/C", "blocks.3.conv/H"]
    by_name = {t.name: list(t.y) for t in fig.data}
    assert by_name["blocks.3.conv/H"] == [2, 3]


def test_energy_figure_normalised_and_cumulative():
    s = [3.0, 1.0, 0.0]  # energies 9, 1, 0 of 10
    e = figures.normalised_energy(s)
    assert np.allclose(e, [0.9, 0.1, 0.0])
    fig = figures.energy_figure({"C": e}, cumulative=False)
    assert np.allclose(fig.data[0].y, [0.9, 0.1, 0.0]) and list(fig.data[0].x) == [1, 2, 3]
    cum = figures.energy_figure({"C": e, "H": [0.5, 0.5]}, cumulative=True, eps_marks=[0.8])
    assert np.allclose(cum.data[0].y, [0.9, 1.0, 1.0]) and np.allclose(cum.data[1].y, [0.5, 1.0])
    assert len(cum.layout.shapes) == 1 and cum.layout.shapes[0].y0 == 0.8
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
