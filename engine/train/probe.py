"""The fine-tuning loop's probe: what one step of a compressed model saved and cost (engine.train.loop.StepProbe)."""
from __future__ import annotations

from engine.memory import StepMeter, peak_due
from engine.train.trainable import Trainable, jsonable, short_name

LOW_RANK_METHODS = ("hosvd", "asi", "lance")


class EngineProbe:
    """Per step: saved bytes (measured, both figures), analytic bytes, FLOPs, ranks, captured energy."""

    def __init__(self, trainable: Trainable, device: str = "cpu", steps_done: int = 0):
        self.wrapper = trainable.wrapper
        self.handle = trainable.handle
        self.method = trainable.handle.method
        self.device = device
        self._steps = steps_done  # a resumed run listed its saved tensors at its own step 1

    def measure(self) -> StepMeter:
        """Saved bytes every step; the measured peak memory on the steps :func:`engine.memory.peak_due` picks;
        the first step also lists saved tensors by op."""
        self._steps += 1
        return StepMeter(self.wrapper, self.device, record_ops=self._steps == 1,
                         measure_peak=peak_due(self._steps - 1, self.device))

    def metrics(self, meter: StepMeter) -> dict[str, float]:
        """The step's metric rows: ``layer_activation_bytes``, ``region_activation_bytes``,
        ``analytic_activation_bytes``, ``peak_memory_bytes`` (when measured), ``saved_op/<op>`` (step 1),
        ``flops``, ``rank/<layer>/<mode>`` (low-rank methods), ``captured_energy/<layer>``."""
        out = {"layer_activation_bytes": float(meter.layer_activation_bytes),
               "region_activation_bytes": float(meter.region_activation_bytes)}
        peak = getattr(meter, "peak_memory_bytes", None)
        if peak is not None:
            out["peak_memory_bytes"] = float(peak)
        for row in getattr(meter, "saved_ops", None) or []:
            out[f"saved_op/{row['op']}"] = float(row["bytes"])
        analytic, flops = 0.0, 0.0
        has_flops = False
        for name, layer in self.handle.layers.items():
            short = short_name(name)
            stats = getattr(layer, "last_stats", None) or {}
            analytic += float(stats.get("analytic_bytes") or 0)
            layer_flops = stats.get("flops")
            if isinstance(layer_flops, dict):
                flops += float(sum(v for v in layer_flops.values() if v is not None))
                has_flops = True
            elif layer_flops is not None:
                flops += float(layer_flops)
                has_flops = True
            ranks = stats.get("ranks")
            if ranks is not None and self.method in LOW_RANK_METHODS:
                for mode, rank in enumerate(jsonable(ranks)):
                    if rank is not None:
                        out[f"rank/{short}/{mode}"] = float(rank)
            energy = stats.get("captured_energy")
            if energy is not None:
                out[f"captured_energy/{short}"] = float(energy)
        out["analytic_activation_bytes"] = analytic
        if has_flops:
            out["flops"] = flops
        return out
