"""Spectra: per layer and mode, singular-value energy; ranks per ε; layers × ε overview; perplexity."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from lance_app import figures
from lance_app.calib import calibration_controls, calibration_view
from lance_app.state import setup_config

st.title("Spectra")
cfg = setup_config()
st.caption(f"**{cfg['backbone']}** ({cfg['weights']}) on **{cfg['dataset']}** · energy of each mode's "
           "unfolding of every compressible layer's input, on calibration batches.")

params = calibration_controls("spectra")
view = calibration_view(cfg, params)
if view is None:
    st.stop()

layers = view["layers"]
eps_grid = view["eps_grid"]
c1, c2 = st.columns([3, 1])
first_tuned = layers.index(view["finetuned"][0]) if view["finetuned"] else len(layers) - 1
layer = c1.selectbox("Layer", layers, index=first_tuned, key="spectra_layer")
cumulative = c2.toggle("Cumulative", value=True, key="spectra_cumulative")
spec = view["spectra"][layer]
energies = {m["mode"]: m["energy"] for m in spec["modes"]}
st.plotly_chart(figures.energy_figure(energies, cumulative=cumulative, eps_marks=eps_grid if cumulative else (),
                                      title=f"{layer} · input {tuple(spec['input_shape'])}"),
                key="spectra_energy")
st.caption("Modes: **B** batch (samples), **C** channels, **H**/**W** height/width of a conv input "
           "(a linear input: **B**, **F** features). Each dashed line marks an ε, the share of a mode's energy "
           "kept: the rank ε needs is where that mode's curve crosses its line.")

ranks = pd.DataFrame(view["ranks"][layer], index=[f"ε={e:g}" for e in eps_grid],
                     columns=[m["mode"] for m in spec["modes"]])
ranks["bytes"] = [figures.format_bytes(b) for b in view["bytes"][layer]]
st.markdown("**Rank each ε needs** (per mode) and the bytes stored at those ranks")
st.dataframe(ranks, key="spectra_ranks")

st.subheader("Overview: layers × ε")
what = st.radio("Show", ["compression (vanilla bytes / stored bytes)", "stored bytes", "rank of the channel mode"],
                horizontal=True, key="spectra_overview")
if what.startswith("compression"):
    z = [[view["vanilla_bytes"][n] / max(1, b) for b in view["bytes"][n]] for n in layers]
    fig = figures.eps_heatmap_figure(layers, eps_grid, z, "compression factor per layer and ε", "×", "{:.0f}×")
elif what == "stored bytes":
    z = [view["bytes"][n] for n in layers]
    fig = figures.eps_heatmap_figure(layers, eps_grid, np.log10(np.maximum(1, z)),
                                     "stored bytes per layer and ε (log10)", "log10 bytes", "{:.1f}")
else:
    z = [[r[1] if len(r) > 1 else r[0] for r in view["ranks"][n]] for n in layers]
    fig = figures.eps_heatmap_figure(layers, eps_grid, z, "rank of mode 2 (channels / features)", "rank")
st.plotly_chart(fig, key="spectra_heatmap")

st.subheader("Perplexity of the fine-tuned layers")
st.caption("**Perplexity** here is the error the compression puts into a layer's weight gradient: "
           "‖dW − dŴ‖ between the gradient from the full input and from the input kept at ε's ranks "
           "(relative: divided by ‖dW‖). Lower is closer to vanilla training; the Budget page minimises its sum.")
if view.get("perplexity"):
    tuned = [n for n in view["finetuned"] if n in view["perplexity"]]
    relative = st.toggle("Relative to ‖dW‖", value=True, key="spectra_relative")
    src = view["relative"] if relative else view["perplexity"]
    st.plotly_chart(figures.perplexity_figure(tuned, eps_grid, [src[n] for n in tuned], relative=relative),
                    key="spectra_perplexity")
else:
    st.info(view.get("perplexity_note") or "No perplexity for this setup.")
