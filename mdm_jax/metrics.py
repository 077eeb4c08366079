"""Metric sinks: stdout, `{workdir}/metrics.jsonl` and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import math
import os

import jax


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            from tensorboardX import SummaryWriter  # local: heavy import, process 0 only

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {f"{prefix}{k}": _py(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        for key, value in clean.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def _py(value):
    """Device scalars -> plain Python numbers for JSON."""
    if value is None or isinstance(value, (int, float, str, bool)):
        return value
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, float) else value


def format_metrics(step: int, metrics: dict) -> str:
    parts = [f"step {step:>6}"]
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)
