"""Continual learning (methods.md §5): LANCE's orthogonal compressed subspaces, GPM, plain fine-tuning.

    >>> from engine.continual import ContinualConfig, run_sequence
    >>> records, learner = run_sequence(model, tasks, ContinualConfig(method="lance", epochs=5))

``model``: a multi-head network (``forward(x, task)``, ``heads``), e.g. ``engine.models.build_multihead``;
``tasks``: objects with ``train``/``test`` datasets of ``(x, task-local label)`` and a ``name``, e.g.
``engine.data.continual.task_splits``.
"""
from .basis import extend_basis, plain_factor, residual_factor
from .learner import METHODS, ContinualConfig, ContinualLearner, prepare_model
from .metrics import average_accuracy, backward_transfer, forgetting, summarize
from .runner import Task, TaskRecord, run_sequence, task_rows

__all__ = [
    "METHODS", "ContinualConfig", "ContinualLearner", "Task", "TaskRecord",
    "average_accuracy", "backward_transfer", "extend_basis", "forgetting", "plain_factor", "prepare_model",
    "residual_factor", "run_sequence", "summarize", "task_rows",
]
