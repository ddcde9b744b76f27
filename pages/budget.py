"""Budget: drag a memory budget over its feasible range, see the exact rank plan and the Σ-perplexity front,
and send the plan to the Fine-tune page (ASI and LANCE train it; methods.md §4, engine.calibration.plan)."""
from __future__ import annotations

import math

import streamlit as st

from engine.calibration.budget import parse_budget
from lance_app import budget_view, glossary
from lance_app.calib import calibration_controls, calibration_view, plan_id, save_plan, solve_plan
from lance_app.figures import format_bytes
from lance_app.form_store import load_form, save_form
from lance_app.paths import pages_dir
from lance_app.predict import step_flops
from lance_app.state import setup_config, show_error
from lance_app.steady import steady_layout

st.title("Budget")
steady_layout()
cfg = setup_config()
st.caption(f"**{cfg['backbone']}** ({cfg['weights']}) on **{cfg['dataset']}**, last {cfg['layers']} layers. "
           + glossary.BUDGET)
with st.expander("What ε, perplexity and B/C/H/W mean"):
    st.markdown(f"- {glossary.EPS}\n- {glossary.PERPLEXITY}\n- {glossary.MODES}")

params = calibration_controls("budget")
view = calibration_view(cfg, params)
if view is None:
    st.stop()
if not [n for n in view["finetuned"] if n in view["perplexity"]]:
    st.info("No fine-tuned layer was measured: set k ≥ 1 on the Setup page.")
    st.stop()

if "budget_batch" not in st.session_state:  # the URL's, else the Fine-tune form's: the plan fits its runs
    st.session_state["budget_batch"] = int(st.query_params.get("budget_batch") or load_form("finetune").get("ft_batch")
                                           or 64)
batch_size = int(st.number_input("Training batch size (the plan's bytes are for batches of this size)",
                                 min_value=1, max_value=4096, step=1, key="budget_batch", bind="query-params"))

options = budget_view.layer_options(view["result"], batch_size)
front_bytes, front_perplexity = budget_view.exact_front(options)
least = int(front_bytes[0])
vanilla_total = int(sum(o["full_bytes"] for o in options))
grid = budget_view.budget_grid(least, vanilla_total)

# The text field holds the budget (exact, in the URL); the log-scaled slider writes it.
if "budget_text" not in st.session_state:
    st.session_state["budget_text"] = (st.query_params.get("budget_text")
                                       or f"{math.ceil(math.sqrt(least * vanilla_total) / 1024)}KiB")


def _slider_moved() -> None:
    st.session_state["budget_text"] = str(int(st.session_state["budget_slider"]))


try:
    typed_bytes = parse_budget(st.session_state["budget_text"])
except ValueError:
    typed_bytes = None
st.session_state["budget_slider"] = budget_view.snap(grid, typed_bytes or least)
st.select_slider(f"Budget (log scale, {format_bytes(least)} … {format_bytes(vanilla_total)}: the least that fits … "
                 "vanilla's bytes); ← → keys step", options=grid, format_func=format_bytes, key="budget_slider",
                 on_change=_slider_moved)
budget_text = st.text_input("…or type an exact budget for the fine-tuned layers (e.g. 64KiB, 0.5MB, 300000)",
                            key="budget_text", bind="query-params")
st.caption(f"For batches of {batch_size}: vanilla stores {format_bytes(vanilla_total)} ({vanilla_total:,} B); "
           f"the least any choice fits in is {format_bytes(least)} ({least:,} B).")

try:
    plan = solve_plan(view["result"], budget_text.strip(), batch_size)
except ValueError as exc:  # BudgetError (unreadable), InfeasibleBudget (says the least that fits)
    st.error(str(exc))
    st.stop()
except Exception as exc:
    show_error(f"Rank selection failed: {exc}", exc)
    st.stop()

total_perplexity = float(sum(layer.perplexity or 0.0 for layer in plan.per_layer))
m1, m2, m3, m4 = st.columns(4)
m1.metric("Budget", format_bytes(plan.budget_bytes))
m2.metric("Chosen total", format_bytes(plan.plan_total_bytes),
          delta=f"{plan.plan_total_bytes / max(1, plan.budget_bytes):.0%} of budget", delta_color="off")
m3.metric("Vanilla", format_bytes(vanilla_total),
          delta=f"{vanilla_total / max(1, plan.plan_total_bytes):.1f}× smaller", delta_color="off")
m4.metric("Σ perplexity", f"{total_perplexity:.4g}")

left, right = st.columns(2)
left.plotly_chart(budget_view.front_figure(front_bytes, front_perplexity, chosen_bytes=plan.plan_total_bytes,
                                           chosen_perplexity=total_perplexity, budget_bytes=plan.budget_bytes,
                                           vanilla_bytes=vanilla_total), key="budget_front")
table = budget_view.rank_table(plan)
right.plotly_chart(budget_view.layer_bars_figure(table["layer"], table["bytes"], table["vanilla bytes"]),
                   key="budget_bars")
st.markdown("**The plan** (ranks per mode; ASI and LANCE store the same core + factors for them)")
st.dataframe(table, hide_index=True, key="budget_table")

c1, c2 = st.columns([1, 3])
if c1.button("Train this plan", type="primary", icon=":material/model_training:", key="budget_train"):
    try:
        path = save_plan(plan)
    except OSError as exc:
        show_error(f"Could not save the plan: {exc}", exc)
    else:
        form = load_form("finetune")
        form.update(plan=plan_id(path), ft_batch=batch_size)
        save_form("finetune", form)
        st.session_state["budget_saved_plan"] = plan_id(path)
        target = pages_dir() / "finetune.py"
        try:
            st.switch_page(target, query_params={"plan": plan_id(path)})
        except st.errors.StreamlitAPIException:  # no navigation (the page run on its own)
            pass
if st.session_state.get("budget_saved_plan"):  # (shown when the page runs without navigation)
    c2.success(f"Plan `{st.session_state['budget_saved_plan']}` saved: the Fine-tune page trains it.")
c2.caption("Saves the plan under $LANCE_HOME/plans and opens the Fine-tune page with it (`?plan=ID`): ASI and "
           f"LANCE train exactly these ranks (`lance finetune --ranks PLAN.json --batch-size {batch_size}`).")

st.markdown("**Predicted FLOPs per training step** of the fine-tuned layers (engine counters, 2 per "
            "multiply-add, on a fresh copy of the backbone and one batch)")
ranks = plan.ranks_for("asi")
flops_key = (cfg["backbone"], cfg["weights"], cfg["dataset"], tuple(sorted(ranks.items())), batch_size,
             int(cfg.get("resolution") or 0), int(cfg["seed"]))
known = st.session_state.setdefault("budget_flops", {})
if st.button("Predict FLOPs for this choice", key="budget_predict") and flops_key not in known:
    try:
        with st.spinner("Counting FLOPs of two training steps…"):
            known[flops_key] = step_flops(cfg["backbone"], cfg["weights"], cfg["dataset"], ranks,
                                          batch_size, cfg.get("resolution") or None, int(cfg["seed"]))
    except Exception as exc:
        show_error(f"FLOP prediction failed: {exc}", exc)
if flops_key in known:
    f1, f2, f3 = st.columns(3)
    f1.metric("ASI at these ranks", f"{known[flops_key]['asi'] / 1e6:,.1f} MFLOP")
    f2.metric("Vanilla", f"{known[flops_key]['vanilla'] / 1e6:,.1f} MFLOP")
    f3.metric("Ratio", f"{known[flops_key]['asi'] / max(1, known[flops_key]['vanilla']):.2f}×")
