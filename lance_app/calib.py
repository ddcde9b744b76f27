"""Calibration and plans for the Spectra and Budget pages: controls, a cached engine call, a flat view of
it, and the plan the Fine-tune job trains.

``engine.calibration.calibrate`` builds its own model and data and caches its JSON under
``$LANCE_HOME/cache/calibration``; here the result dict is also kept in ``st.cache_data`` so a page
rerun does not even read the file. Calibration runs forward/backward passes once under no training,
in the script thread, with a progress bar (small-cnn-digits on digits-5to9: about a second). The controls default
to ``lance calibrate``'s own settings (its 12-ε grid, 2 batches of 64), so the page shows what the CLI
and a plain ``lance finetune --budget`` compute.

Plans (engine.calibration.plan), for the Budget page's "train this plan":

- :func:`solve_plan` ``(calibration, budget_bytes, batch_size) -> Plan``: the exact rank choice for
  training batches of ``batch_size`` (bytes recomputed at that batch size);
- :func:`save_plan` ``(plan, path=None) -> Path``: writes the plan file (default under
  ``$LANCE_HOME/plans/``);
- :func:`plan_finetune_args` ``(plan_path, plan) -> [...]``: the ``lance finetune`` arguments that train
  exactly it with ASI and LANCE (``--ranks PLAN.json --batch-size B``);
- :func:`budget_finetune_args`: the arguments of a plain budget (applies to ASI *and* LANCE).
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from pathlib import Path

import streamlit as st

from engine.calibration import (
    DEFAULT_EPS_GRID,  # `lance calibrate`'s grid: the page shows what the CLI computes
    calibrate,
)
from engine.calibration import plan as plan_mod
from engine.functional import tucker_bytes
from engine.home import lance_home
from lance_app.catalog import Unavailable
from lance_app.state import show_error

DEFAULT_CALIBRATION_BATCHES = 2      # `lance calibrate --batches` default
DEFAULT_CALIBRATION_BATCH_SIZE = 64  # `lance calibrate --batch-size` default
ELEMENT_BYTES = 4
Plan = plan_mod.Plan


def calibration_controls(page: str) -> dict:
    """Batches, batch size and ε grid (shared by the Spectra and Budget pages)."""
    params = st.session_state.setdefault("calib_params", {"batches": DEFAULT_CALIBRATION_BATCHES,
                                                         "batch_size": DEFAULT_CALIBRATION_BATCH_SIZE,
                                                         "eps": ",".join(f"{e:g}" for e in DEFAULT_EPS_GRID)})
    with st.expander("Calibration settings", expanded=False):
        c1, c2, c3 = st.columns([1, 1, 3])
        params["batches"] = int(c1.number_input("Batches", 1, 100, params["batches"], key=f"{page}_batches"))
        params["batch_size"] = int(c2.number_input("Batch size", 1, 1024, params["batch_size"],
                                                   key=f"{page}_batch_size"))
        params["eps"] = c3.text_input("ε grid (comma separated, each in (0, 1])", params["eps"], key=f"{page}_eps")
    return params


def parse_eps_grid(text: str) -> tuple[float, ...]:
    """'0.5, 0.9' -> (0.5, 0.9); raises ValueError with what to write."""
    try:
        grid = tuple(sorted({float(t) for t in text.replace(";", ",").split(",") if t.strip()}))
    except ValueError:
        raise ValueError(f"cannot read the ε grid {text!r}: write numbers in (0, 1] separated by commas, "
                         "e.g. 0.5,0.7,0.9") from None
    if not grid or any(not 0 < e <= 1 for e in grid):
        raise ValueError(f"every ε must lie in (0, 1]; got {text!r}")
    return grid


@st.cache_resource(show_spinner=False)
def _results() -> dict:
    """Process-wide {calibration key: result dict} (at most 16 kept)."""
    return {}


def _calibrate(backbone: str, weights: str, dataset: str, layers_k: int, eps_grid: tuple, batches: int,
               batch_size: int, resolution: int, seed: int) -> dict:
    key = (backbone, weights, dataset, layers_k, eps_grid, batches, batch_size, resolution, seed)
    cache = _results()
    if key in cache:
        return cache[key]
    bar = st.progress(0.0, text="Calibrating…")

    def progress(stage: str, done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(1, total)), text=f"Calibrating: {stage} {done}/{total}")

    try:
        result = calibrate(backbone, weights=weights, dataset=dataset, layers_k=layers_k,
                           eps_grid=list(eps_grid), batches=batches, batch_size=batch_size,
                           resolution=resolution or None, seed=seed, progress=progress)
    finally:
        bar.empty()
    if len(cache) >= 16:
        cache.pop(next(iter(cache)))
    cache[key] = result.to_dict()
    return cache[key]


def default_calibration(cfg: dict) -> dict:
    """The calibration a run with ``--budget`` and no ``--calibration`` makes for the Setup config ``cfg``
    (``lance calibrate``'s defaults: its ε grid, 2 batches of 64), cached like the pages' own."""
    return _calibrate(cfg["backbone"], cfg["weights"], cfg["dataset"], int(cfg["layers"]), tuple(DEFAULT_EPS_GRID),
                      DEFAULT_CALIBRATION_BATCHES, DEFAULT_CALIBRATION_BATCH_SIZE, int(cfg.get("resolution") or 0),
                      int(cfg["seed"]))


def _tucker_bytes(shape, ranks) -> int:
    return int(tucker_bytes(list(shape), list(ranks), ELEMENT_BYTES))


def view_from_result(result: dict) -> dict:
    """Flatten a CalibrationResult dict into what the pages draw (every layer gets bytes per ε)."""
    layers = [layer["name"] for layer in result["layers"]]
    by_name = {layer["name"]: layer for layer in result["layers"]}
    view = {"layers": layers, "eps_grid": list(result["eps_grid"]), "spectra": by_name,
            "ranks": {}, "bytes": {}, "vanilla_bytes": {}, "finetuned": list(result["finetuned_layers"]),
            "perplexity": {}, "relative": {}, "batch_size": result["batch_size"], "result": result,
            "timing": result.get("timing", {}), "from_cache": result.get("from_cache", False)}
    for name, layer in by_name.items():
        view["ranks"][name] = [list(r) for r in layer["ranks"]]
        shape = [result["batch_size"], *layer["input_shape"][1:]]
        view["vanilla_bytes"][name] = int(layer.get("full_bytes") or math.prod(shape) * ELEMENT_BYTES)
        if layer.get("bytes") is not None:
            view["bytes"][name] = [int(b) for b in layer["bytes"]]
        else:
            # never worse than raw: a Tucker form not smaller than the input is stored as the input
            view["bytes"][name] = [min(_tucker_bytes(shape, [min(int(r), d) for r, d in zip(ranks, shape)]),
                                       view["vanilla_bytes"][name]) for ranks in layer["ranks"]]
        if layer.get("perplexity") is not None:
            view["perplexity"][name] = layer["perplexity"]
            view["relative"][name] = layer["relative_perplexity"]
    if not view["perplexity"]:
        view["perplexity_note"] = "No fine-tuned layers were measured (set k ≥ 1 on the Setup page)."
    return view


def calibration_view(cfg: dict, params: dict) -> dict | None:
    """The calibration of the current setup as a view dict, or None after showing why not."""
    try:
        eps_grid = parse_eps_grid(params["eps"])
    except ValueError as exc:
        st.error(str(exc))
        return None
    try:
        result = _calibrate(cfg["backbone"], cfg["weights"], cfg["dataset"], int(cfg["layers"]), eps_grid,
                            int(params["batches"]), int(params["batch_size"]), int(cfg.get("resolution") or 0),
                            int(cfg["seed"]))
    except Unavailable as exc:
        st.info(f"Calibration unavailable: {exc}")
        return None
    except Exception as exc:  # missing dataset / weights, bad layer count: the engine's message
        show_error(f"Calibration of {cfg['backbone']} on {cfg['dataset']} failed: {exc}", exc)
        return None
    view = view_from_result(result)
    t = view["timing"]
    st.caption(f"Calibration: {t.get('batches', params['batches'])} batch(es) of {view['batch_size']}, "
               f"{len(view['layers'])} layers, {len(view['finetuned'])} fine-tuned"
               + (" · from cache" if view["from_cache"] else
                  f" · {t.get('total_s', 0):.1f} s" if t.get("total_s") else ""))
    return view


# -- plans: what the Fine-tune job trains ------------------------------------------------------------
def solve_plan(calibration: dict, budget_bytes: int | str, batch_size: int) -> Plan:
    """The exact plan for ``budget_bytes`` at training batches of ``batch_size`` (engine.calibration.plan).

    ``calibration``: the calibration dict (``view["result"]``, or a ``CalibrationResult``). Bytes are those
    ASI and LANCE store at ``batch_size``; ``plan.plan_total_bytes <= budget``. Raises ``InfeasibleBudget``
    (a ``ValueError`` whose message states the least budget that fits), ``BudgetError`` for an unreadable
    budget string.
    """
    return plan_mod.solve_plan(calibration, budget_bytes, int(batch_size), source="app Budget page")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-")[:40] or "plan"


def save_plan(plan: Plan, path: str | Path | None = None) -> Path:
    """Write ``plan`` as JSON and return its path: ``path``, or a new file under ``$LANCE_HOME/plans/``
    named ``<UTC time>-<backbone>-<budget bytes>B-b<batch size>.json``."""
    if path is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        name = f"{stamp}-{_slug(plan.backbone or 'model')}-{plan.budget_bytes}B-b{plan.batch_size}.json"
        path = plans_dir() / name
    return plan.save(path)


def plans_dir() -> Path:
    """Where the app keeps plan files: ``$LANCE_HOME/plans``."""
    return lance_home() / "plans"


def plan_id(path: str | Path) -> str:
    """A saved plan's id (its file name without ``.json``): what the Fine-tune page's ``?plan=`` holds."""
    return Path(path).stem


def plan_path(plan_id_: str) -> Path:
    """The file of the saved plan ``plan_id_`` under :func:`plans_dir` (raises ``PlanError`` for an id that is
    not a plain file name, or a plan that is not there)."""
    if not plan_id_ or not re.fullmatch(r"[A-Za-z0-9_.-]+", plan_id_) or plan_id_.startswith("."):
        raise plan_mod.PlanError(f"{plan_id_!r} is not a plan id: open a plan from the Budget page "
                                 "(“Train this plan”)")
    path = plans_dir() / f"{plan_id_}.json"
    if not path.is_file():
        raise plan_mod.PlanError(f"plan {plan_id_!r} is not in {plans_dir()}: make it again on the Budget page")
    return path


def load_plan(path: str | Path) -> Plan:
    """Read a plan file (raises ``PlanError``, a ``ValueError``, with what to do)."""
    return plan_mod.load_plan(path)


def plan_finetune_args(plan_path: str | Path, plan: Plan | None = None) -> list[str]:
    """``lance finetune`` arguments that train exactly this plan with ASI and LANCE.

    Add them to the job's arguments instead of ``--budget``/``--eps lance=…``/``--batch-size``: the plan
    fixes the ranks and the batch size (the run refuses a plan of another backbone, other layers or
    another batch size, with exit status 2 and no run created).
    """
    plan = plan or load_plan(plan_path)
    return ["--ranks", str(plan_path), "--batch-size", str(plan.batch_size)]


def budget_finetune_args(budget: str, methods: list[str], calibration_path: str | Path | None = None) -> list[str]:
    """Arguments of a plain budget: one value, so it applies to ASI *and* LANCE (``[]`` when neither runs or
    the budget is empty). Without ``calibration_path`` the run calibrates once with ``lance calibrate``'s
    defaults; LANCE must then get no ``--eps``."""
    if not str(budget).strip() or not {"asi", "lance"} & set(methods):
        return []
    args = ["--budget", str(budget).strip()]
    if calibration_path is not None:
        args += ["--calibration", str(calibration_path)]
    return args
