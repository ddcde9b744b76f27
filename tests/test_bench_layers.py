"""`lance bench layers`: several batch sizes, per-layer time and FLOP ratios, --real, --device checks."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import needs_cifar10_jpeg, needs_mcunet_weights

from engine.cli import main as lance_main


def test_batch_sizes_report_per_layer_ratios(tmp_path):
    out = tmp_path / "bench.json"
    assert lance_main(["bench", "layers", "--backbones", "mcunet-in3", "--batch-sizes", "2,5", "--repeats", "1",
                       "--full-rank", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["batch_sizes"] == [2, 5] and report["config"]["inputs"] == "synthetic"
    assert set(report["by_batch_size"]) == {"2", "5"}
    for size, sub in report["by_batch_size"].items():
        rows = sub["results"]
        assert len(rows) == 4 * 5 and {r["shape"][0] for r in rows} == {int(size)}
        for r in rows:
            assert r["time_ratio_vs_vanilla"] > 0 and r["flops_ratio_vs_vanilla"] > 0
            assert r["time_over_flops"] == pytest.approx(r["time_ratio_vs_vanilla"] / r["flops_ratio_vs_vanilla"],
                                                         rel=1e-2, abs=2e-3)
            if r["method"] == "vanilla":
                assert r["time_ratio_vs_vanilla"] == 1.0 and r["flops_ratio_vs_vanilla"] == 1.0
            elif r["method"] != "gradient_filter":
                assert r["grad_rel_error"] < 1e-5, r
        summary = sub["summary"]
        assert summary["vanilla"]["max_layer_time_ratio"] == 1.0
        worst = max(r["time_ratio_vs_vanilla"] for r in rows if r["method"] == "asi")
        assert summary["asi"]["max_layer_time_ratio"] == worst


def test_real_without_shared_skips_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LANCE_SHARED", str(tmp_path / "no-shared-here"))
    out = tmp_path / "bench.json"
    assert lance_main(["bench", "layers", "--real", "--batch-sizes", "4", "--json", str(out)]) == 0
    assert "skipped" in capsys.readouterr().err
    assert "weights not found" in json.loads(out.read_text())["skipped"]


@pytest.mark.parametrize("argv", [["--batch-sizes", "4,x"], ["--batch-sizes", "0"], ["--device", "tpu"]])
def test_bad_arguments_are_refused(argv, capsys):
    assert lance_main(["bench", "layers", *argv]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused(capsys):
    assert lance_main(["bench", "layers", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@needs_mcunet_weights
@needs_cifar10_jpeg
@pytest.mark.shared
def test_real_layers_real_gradients(tmp_path):
    out = tmp_path / "bench.json"
    assert lance_main(["bench", "layers", "--real", "--batch-sizes", "4", "--repeats", "1", "--full-rank",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["inputs"] == "real"
    rows = report["by_batch_size"]["4"]["results"]
    shapes = {r["layer"].split(":")[1]: r["shape"] for r in rows}
    assert shapes["blocks.17.mobile_inverted_conv.depth_conv.conv"] == [4, 480, 6, 6]
    assert shapes["classifier.linear"] == [4, 160]
    for r in rows:
        if r["method"] not in ("gradient_filter", "vanilla"):
            assert r["grad_rel_error"] < 1e-4, r
    # the real output gradient of the last conv is spatially constant (global average pool after it), so
    # gradient filtering is exact there — and not on the depthwise conv before it
    gf = {r["layer"].split(":")[1]: r["grad_rel_error"] for r in rows if r["method"] == "gradient_filter"}
    assert gf["blocks.17.mobile_inverted_conv.point_linear.conv"] < 1e-5
    assert gf["blocks.17.mobile_inverted_conv.depth_conv.conv"] > 1e-2
