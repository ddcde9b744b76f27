"""Fine-tuning: the loop (events out), sinks (store rows, progress bar), runs of several methods.

    from engine.train import FinetuneConfig, run_finetune
    results = run_finetune(FinetuneConfig(backbone="small-cnn", dataset="digits", methods=["vanilla", "asi"]))

See docs/finetune.md.
"""
from engine.train.config import METHODS, ConfigError, FinetuneConfig, validate
from engine.train.events import EpochEnded, RunEnded, RunStarted, StepEnded
from engine.train.faults import RunInterrupted, TrainingDiverged
from engine.train.loop import LoopState, evaluate, fit
from engine.train.session import run_finetune
from engine.train.sinks import ProgressSink, RecordingSink, StoreSink
from engine.train.summary import RunResult, summarize

__all__ = [
    "METHODS", "ConfigError", "FinetuneConfig", "validate", "EpochEnded", "RunEnded", "RunStarted", "StepEnded",
    "RunInterrupted", "TrainingDiverged", "LoopState", "evaluate", "fit", "RunResult", "run_finetune",
    "summarize", "ProgressSink", "RecordingSink", "StoreSink",
]
