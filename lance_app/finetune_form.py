"""The Fine-tune form's values: defaults, checking with readable messages, and the `lance finetune`
arguments they make. No Streamlit calls (the page draws the widgets; this decides what they mean).

Field keys are the widget keys (``ft_methods``, ``ft_epochs``, …), also the keys of the form store
(:mod:`lance_app.form_store`, form ``"finetune"``; ``seed_session`` puts them back in the widgets' types),
so a reload finds the last values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULTS = {"ft_methods": ["vanilla", "asi"], "ft_epochs": 1, "ft_batch": 64, "ft_lr": 0.05, "ft_limit": 512,
            "ft_limit_val": 0, "ft_eps_hosvd": 0.8, "ft_eps_lance": 0.95, "ft_budget": ""}
LABELS = {"ft_epochs": "Epochs", "ft_batch": "Batch size", "ft_lr": "Learning rate",
          "ft_limit": "Training images", "ft_limit_val": "Validation images", "ft_eps_hosvd": "HOSVD ε",
          "ft_eps_lance": "LANCE ε"}
# (key, whole number?, least, most, what to write)
RULES = [
    ("ft_epochs", True, 1, 1000, "a whole number from 1 to 1000"),
    ("ft_batch", True, 1, 4096, "a whole number from 1 to 4096"),
    ("ft_lr", False, 1e-6, 10.0, "a number above 0 and at most 10 (e.g. 0.05)"),
    ("ft_limit", True, 0, 10_000_000, "a whole number ≥ 0 (0 = all training images)"),
    ("ft_limit_val", True, 0, 10_000_000, "a whole number ≥ 0 (0 = all validation images)"),
    ("ft_eps_hosvd", False, 1e-9, 1.0, "a number in (0, 1], e.g. 0.8"),
    ("ft_eps_lance", False, 1e-9, 1.0, "a number in (0, 1], e.g. 0.95"),
]


@dataclass
class FormCheck:
    """What the form's values mean: ``values`` cleaned (whole numbers as int), ``errors`` {key: message}."""

    values: dict
    errors: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_form(values: dict) -> FormCheck:
    """Check every field; each error names the field, what it got and what to write."""
    out = dict(values)
    errors = {}
    if not values.get("ft_methods"):
        errors["ft_methods"] = "Methods: choose at least one method."
    for key, whole, least, most, what in RULES:
        value = values.get(key)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or (whole and number != int(number)) or not least <= number <= most:
            errors[key] = f"{LABELS[key]}: got {value!r}; write {what}."
            continue
        out[key] = int(number) if whole else number
    return FormCheck(out, errors)


def finetune_args(cfg: dict, values: dict, plan_args: list[str] | None = None,
                  budget_args: list[str] | None = None) -> list[str]:
    """``lance finetune`` arguments for the Setup config ``cfg`` and checked form ``values``.

    ``plan_args``: ``--ranks PLAN --batch-size B`` of a plan (ASI and LANCE train it; the form's batch size
    and LANCE ε are then not used); ``budget_args``: ``--budget X`` (ASI and LANCE; LANCE ε not used).
    """
    methods = list(values["ft_methods"])
    args = ["--backbone", cfg["backbone"], "--weights", cfg["weights"], "--dataset", cfg["dataset"],
            "--method", ",".join(methods), "--layers", str(cfg["layers"]), "--epochs", str(values["ft_epochs"]),
            "--lr", f"{values['ft_lr']:g}", "--seed", str(cfg["seed"])]
    if not plan_args:
        args += ["--batch-size", str(values["ft_batch"])]
    if values.get("ft_limit"):
        args += ["--limit-train", str(values["ft_limit"])]
    if values.get("ft_limit_val"):
        args += ["--limit-val", str(values["ft_limit_val"])]
    planned = bool(plan_args or budget_args)
    eps = [f"{m}={values['ft_eps_hosvd'] if m == 'hosvd' else values['ft_eps_lance']:g}" for m in methods
           if m == "hosvd" or (m == "lance" and not planned)]
    if eps:
        args += ["--eps", ",".join(eps)]
    args += list(plan_args or budget_args or [])
    if cfg.get("resolution"):
        args += ["--resolution", str(cfg["resolution"])]
    return args
