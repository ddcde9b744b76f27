"""Sweeps: a grid of fine-tuning or continual runs (methods × budgets/ε/any option × seeds) on Ray.

    >>> from engine.sweep import SweepSpec, run_sweep, sweep_results
    >>> spec = SweepSpec(kind="finetune", methods=["asi", "lance"], seeds=[0, 1],
    ...                  axes={"budget": ["20kB", "40kB"]}, base={"layers": 2, "epochs": 1})
    >>> sweep_id = run_sweep(spec, workers=2)          # a local Ray instance, or address="ray://..."
    >>> sweep_results(sweep_id)["front"]                # {method: [configuration keys on the front]}

Every trial is a normal run in the run store (``job_id = <sweep_id>:<trial key>``; config
``sweep_id``, ``sweep_trial``); the grid and the trials' outcomes are in ``engine.store.sweeps``.
"""
from engine.sweep.results import (
           configurations_csv,
           pareto_front,
           sweep_results,
           trial_metrics,
)
from engine.sweep.runner import (
           RayMissing,
           log_trial,
           new_sweep_id,
           prepare_sweep,
           run_sweep,
           start_ray,
)
from engine.sweep.spec import SweepError, SweepSpec, Trial, parse_value

__all__ = [
           "RayMissing",
           "SweepError",
           "SweepSpec",
           "Trial",
           "configurations_csv",
           "log_trial",
           "new_sweep_id",
           "pareto_front",
           "parse_value",
           "prepare_sweep",
           "run_sweep",
           "start_ray",
           "sweep_results",
           "trial_metrics",
]
