"""Budget: an activation-memory budget -> the exact rank choice per fine-tuned layer (ASI, methods.md §4)."""
from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from lance_app import figures
from lance_app.calib import calibration_controls, calibration_view
from lance_app.catalog import Unavailable, engine_attr_any
from lance_app.predict import step_flops
from lance_app.state import setup_config, show_error

st.title("Budget")
cfg = setup_config()
st.caption(f"**{cfg['backbone']}** ({cfg['weights']}) on **{cfg['dataset']}**, last {cfg['layers']} layers · "
           "one ε per layer minimising the total weight-gradient error with the stored bytes under the "
           "budget (exact multiple-choice knapsack, costs rounded up).")

params = calibration_controls("budget")
view = calibration_view(cfg, params)
if view is None:
    st.stop()
tuned = [n for n in view["finetuned"] if n in view["perplexity"]]
if not tuned:
    st.info("No fine-tuned layer was measured: set k ≥ 1 on the Setup page.")
    st.stop()

vanilla_total = sum(view["vanilla_bytes"][n] for n in tuned)
least = sum(min(view["bytes"][n]) for n in tuned)
most = sum(max(view["bytes"][n]) for n in tuned)
default = f"{math.ceil(math.sqrt(max(1, least) * max(1, most)) / 1024)}KiB"
st.session_state.setdefault("budget_text", default)
budget_text = st.text_input("Activation memory budget for the fine-tuned layers (e.g. 64KiB, 0.5MB, 300000)",
                            key="budget_text")
st.caption(f"For a batch of {view['batch_size']}: vanilla stores {figures.format_bytes(vanilla_total)}; "
           f"the least any ε choice fits in is {figures.format_bytes(least)} ({least:,} bytes).")

try:
    select_ranks = engine_attr_any(("engine.calibration", "select_ranks"),
                                  ("engine.calibration.selection", "select_ranks"))
    selection = select_ranks(view["result"], budget_text)
except Unavailable as exc:
    st.info(f"Rank selection unavailable: {exc}")
    st.stop()
except ValueError as exc:  # BudgetError (unreadable), InfeasibleBudget (says the least that fits)
    st.error(str(exc))
    st.stop()
except Exception as exc:
    show_error(f"Rank selection failed: {exc}", exc)
    st.stop()

m1, m2, m3, m4 = st.columns(4)
m1.metric("Budget", figures.format_bytes(selection.budget_bytes))
m2.metric("Chosen total", figures.format_bytes(selection.total_bytes),
          delta=f"{selection.total_bytes / max(1, selection.budget_bytes):.0%} of budget", delta_color="off")
m3.metric("Vanilla", figures.format_bytes(vanilla_total),
          delta=f"{vanilla_total / max(1, selection.total_bytes):.1f}× smaller", delta_color="off")
m4.metric("Σ perplexity", f"{selection.total_perplexity:.3g}")

table = pd.DataFrame([{"layer": c.name, "ε": c.eps, "ranks": str(tuple(c.ranks)), "bytes": c.bytes,
                       "vanilla bytes": view["vanilla_bytes"][c.name], "perplexity": c.perplexity,
                       "relative": c.relative_perplexity} for c in selection.layers])
st.dataframe(table, hide_index=True, key="budget_table")
st.plotly_chart(figures.budget_bars_figure(table["layer"], table["bytes"], table["vanilla bytes"],
                                           budget_bytes=selection.budget_bytes), key="budget_bars")

st.markdown("**Predicted FLOPs per training step** of the fine-tuned layers (engine counters, 2 per "
            "multiply-add, on a fresh copy of the backbone and one calibration batch)")
ranks = {c.name: tuple(c.ranks) for c in selection.layers}
flops_key = (cfg["backbone"], cfg["weights"], cfg["dataset"], tuple(sorted(ranks.items())), view["batch_size"],
             int(cfg.get("resolution") or 0), int(cfg["seed"]))
known = st.session_state.setdefault("budget_flops", {})
if st.button("Predict FLOPs for this choice", key="budget_predict") and flops_key not in known:
    try:
        with st.spinner("Counting FLOPs of two training steps…"):
            known[flops_key] = step_flops(cfg["backbone"], cfg["weights"], cfg["dataset"], ranks,
                                          view["batch_size"], cfg.get("resolution") or None, int(cfg["seed"]))
    except Exception as exc:
        show_error(f"FLOP prediction failed: {exc}", exc)
if flops_key in known:
    f1, f2, f3 = st.columns(3)
    f1.metric("ASI at these ranks", f"{known[flops_key]['asi'] / 1e6:,.1f} MFLOP")
    f2.metric("Vanilla", f"{known[flops_key]['vanilla'] / 1e6:,.1f} MFLOP")
    f3.metric("Ratio", f"{known[flops_key]['asi'] / max(1, known[flops_key]['vanilla']):.2f}×")

st.session_state["asi_budget"] = budget_text
st.caption("The Fine-tune page's ASI budget field uses this budget.")
