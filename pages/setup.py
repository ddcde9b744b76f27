"""Setup: backbone, weights, dataset, resolution, fine-tuned layers; what is here and what is missing."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from lance_app import catalog
from lance_app.catalog import Unavailable
from lance_app.resources import dataset_classes, layer_names, pristine_backbone
from lance_app.state import setup_config, show_error

st.title("Setup")
st.caption("Choose what to fine-tune. The embedded default (small-cnn-digits, pretrained on digits 0–4 and bundled, "
           "fine-tuned on the digits 5–9 it never saw) works "
           "offline; datasets and weights found under LANCE_DATA_ROOT / LANCE_WEIGHTS_DIR / ../shared "
           "appear below.")
cfg = setup_config()

try:
    backbones = catalog.backbone_names()
except Unavailable as exc:
    backbones = []
    st.error(f"No backbones: {exc}")

datasets = catalog.dataset_options()
available_datasets = [o for o in datasets if o.available]

col1, col2 = st.columns(2)
with col1:
    if backbones:
        idx = backbones.index(cfg["backbone"]) if cfg["backbone"] in backbones else 0
        cfg["backbone"] = st.selectbox("Backbone", backbones, index=idx, key="setup_backbone")
        st.caption(catalog.backbone_summary(cfg["backbone"]))
    weights = catalog.weights_options(cfg["backbone"])
    usable = [o for o in weights if o.available]
    values = [o.value for o in usable]
    idx = values.index(cfg["weights"]) if cfg["weights"] in values else 0
    choice = st.radio("Weights", usable, index=idx, format_func=lambda o: o.label, key="setup_weights")
    cfg["weights"] = choice.value
    st.caption(choice.detail)
with col2:
    dvalues = [o.value for o in available_datasets]
    idx = dvalues.index(cfg["dataset"]) if cfg["dataset"] in dvalues else 0
    dchoice = st.selectbox("Dataset", available_datasets, index=idx, format_func=lambda o: o.label,
                           key="setup_dataset")
    cfg["dataset"] = dchoice.value
    st.caption(dchoice.detail)
    cfg["resolution"] = int(st.number_input("Resolution (px, 0 = the backbone's native)", 0, 512,
                                            int(cfg["resolution"]), step=8, key="setup_resolution"))
    cfg["seed"] = int(st.number_input("Seed", 0, 2**31 - 1, int(cfg["seed"]), key="setup_seed"))

st.subheader("Fine-tuned layers")
names: list[str] = []
try:
    n_classes = dataset_classes(cfg["dataset"])
    names = layer_names(cfg["backbone"], cfg["weights"], n_classes)
except Unavailable as exc:
    st.info(f"Layer list unavailable: {exc}")
except Exception as exc:
    show_error(f"Could not build {cfg['backbone']} for {cfg['dataset']}: {exc}", exc)

max_k = max(1, len(names)) if names else 16
cfg["layers"] = int(st.slider("Fine-tune the last k compressible layers", 1, max_k,
                              min(int(cfg["layers"]), max_k), key="setup_layers"))
if names:
    k = cfg["layers"]
    table = pd.DataFrame({"layer": names,
                          "trained": ["yes" if i >= len(names) - k else "frozen" for i in range(len(names))]})
    st.dataframe(table, hide_index=True, height=min(400, 36 * (len(names) + 1)))
    bb = pristine_backbone(cfg["backbone"], cfg["weights"], n_classes)
    st.caption(f"{len(names)} compressible layers · native resolution {bb.resolution} px · "
               f"{sum(p.numel() for p in bb.model.parameters()):,} parameters")

st.subheader("What is here")
rows = [{"kind": "dataset", "name": o.label, "available": "yes" if o.available else "missing",
         "where / how to get it": o.detail} for o in datasets]
for b in backbones:
    for o in catalog.weights_options(b):
        if o.value != "none":
            rows.append({"kind": "weights", "name": f"{b}: {o.label}",
                         "available": "yes" if o.available else "missing", "where / how to get it": o.detail})
st.dataframe(pd.DataFrame(rows), hide_index=True)
st.success(f"Current setup: **{cfg['backbone']}** ({cfg['weights']}) on **{cfg['dataset']}**, "
           f"last {cfg['layers']} layers, seed {cfg['seed']}.")
