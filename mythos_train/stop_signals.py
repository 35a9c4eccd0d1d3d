"""Stop on a signal without losing work: finish the step on every rank, save, exit with STOPPED_EXIT.

SIGTERM is what SLURM and Kubernetes send before they kill a job, SIGINT is Ctrl-C, and SLURM's `--signal`
sends SIGUSR1 ahead of the time limit (`train.stop_signals`). A handler only records the signal; after each
optimizer step the ranks all-reduce that flag (one tiny collective), so a signal that reached some ranks only,
or reached them during different steps, still stops every rank after the same step. The trainer then saves a
checkpoint of that step and the process exits with STOPPED_EXIT, which the launchers pass on and the SLURM
script requeues on; the next start resumes from that checkpoint with no step lost. The flag is checked after each
step and again after an eval (a signal during a long eval must not wait for another step). With checkpoints
disabled the process exits STOPPED_UNSAVED_EXIT instead: a requeued run would start from step 0 again, forever.
`agreed` reads the all-reduced flag on the host: a second host sync per step besides the loss/grad-norm read.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch

from mythos_train.distributed import all_reduce_sum

logger = logging.getLogger(__name__)

STOPPED_EXIT = 75
"Exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL: start it again to resume)."
STOPPED_UNSAVED_EXIT = 76
"Exit status of a run stopped by a signal with checkpoint.enabled = false: nothing to resume, so not requeued."


class StopSignals:
    """Context manager: while active, the given signals request a stop instead of killing the process."""

    def __init__(self, names: list[str]) -> None:
        self.signals = [signal.Signals[name] for name in names]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning("%s received: stopping after this step, with a checkpoint", self.received.name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal (collective: every rank calls it after every step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)
