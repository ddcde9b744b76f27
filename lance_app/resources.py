"""Cached engine objects for the pages: pristine backbones (never trained in the app) and lookups.

``st.cache_resource`` shares one pristine model between sessions; pages only read it (layer names,
calibration forward passes under no_grad). Training happens in job subprocesses that build their
own model, so a model being trained is never shared.
"""
from __future__ import annotations

import streamlit as st

import engine
from engine.data import num_classes
from engine.models import build_backbone


@st.cache_resource(show_spinner="Building the backbone…", max_entries=4)
def pristine_backbone(name: str, weights: str, num_classes: int):
    """engine.models.build_backbone(name, weights, num_classes) in eval mode. Raises Unavailable."""
    backbone = build_backbone(name, weights=weights, num_classes=num_classes)
    backbone.model.eval()
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    return backbone


@st.cache_data(show_spinner=False, max_entries=32)
def dataset_classes(dataset: str) -> int:
    """engine.data.num_classes(dataset). Raises Unavailable / DatasetMissing."""
    return int(num_classes(dataset))


@st.cache_data(show_spinner=False, max_entries=16)
def layer_names(name: str, weights: str, num_classes: int) -> list[str]:
    """Compressible (conv / linear) layer names of the backbone, in forward order."""
    return list(engine.compressible_layers(pristine_backbone(name, weights, num_classes).model))
