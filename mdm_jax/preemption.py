"""Graceful stops: SIGTERM/SIGINT finish the current step, save, and stop the run.

One process: Python signal handlers set a flag the loop reads after each step. Several
processes: every host must save the *same* step, so the loop asks JAX's preemption sync point
(`CheckpointManager.reached_preemption`), which agrees on a step across hosts once any host was
sent SIGTERM (the preemption service that `jax.distributed.initialize` starts catches SIGTERM
itself). A Ctrl-C on one host is turned into a SIGTERM to itself so that it takes the same path.
After the save the trainer exits with `config.preemption_exit_code` (42 under the pod launchers,
so xpk restarts the workload and `launch/slurm.sbatch` requeues the job).
"""

from __future__ import annotations

import os
import signal
import threading

import jax


def preemption_service_running() -> bool:
    """Whether JAX's cross-host preemption sync point is available in this process."""
    return (jax.process_count() > 1 and jax.distributed.is_initialized()
            and bool(jax.config.jax_enable_preemption_service))


class PreemptionGuard:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        self._sync_point = preemption_service_running()
        if jax.process_count() > 1 and not self._sync_point:
            raise RuntimeError(
                f"jax sees {jax.process_count()} processes but jax.distributed (and its "
                f"preemption service) is not running; start through mdm_jax.distributed."
                f"initialize() so that a SIGTERM saves the same step on every host")
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        # With the sync point, SIGTERM belongs to JAX's handler: installing ours would replace it.
        signals = (signal.SIGINT,) if self._sync_point else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signal_name = signal.Signals(signum).name
        if self._sync_point:  # let every host agree on the step to save at
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int, manager) -> bool:
        if self._sync_point and manager.reached_preemption(step):
            self.signal_name = self.signal_name or "SIGTERM"
            return True
        return self.signal_name is not None and not self._sync_point

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
