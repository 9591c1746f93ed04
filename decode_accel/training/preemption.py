"""Graceful pre-emption: SIGTERM / SIGINT -> checkpoint at the next optimizer update, then a clean exit.

Clusters (SLURM, Kubernetes, spot instances) announce the end of a job with SIGTERM and kill it a
grace period later (typically 30 s to a few minutes). Without a handler Python dies at once and the
work since the last epoch checkpoint is lost. ``PreemptionHook`` turns the signal into a flag; the
training loop looks at the flag after each optimizer update (``on_step_end``), so the weights,
optimizer and data position it saves are those of a finished update, never of a half-done one.

Decisions:

* **agreed across processes by the trainer**: the hook only asks ``trainer.request_stop(immediate=True,
  exit_code=...)``; the trainer agrees with the other processes (free with one process; with several,
  one small all-reduce every ``sync_every`` updates and at each epoch end), so all ranks stop at the
  same update even when the launcher signalled only some of them, and all exit with the same code
  (130 if any rank saw SIGINT);
* **SIGTERM** -> checkpoint, then ``SystemExit(0)``: the job was asked to stop and stopped correctly,
  so schedulers that requeue on success (or on a zero exit) resume it with ``--resume``;
* **SIGINT** (Ctrl-C) -> the same checkpoint, then ``SystemExit(130)`` (128 + SIGINT, the shell's code
  for "interrupted"), so a script can tell an interrupted run from a finished one. A *second* Ctrl-C
  before the checkpoint is written gives up on it and raises ``KeyboardInterrupt`` at once;
* mid-epoch the trainer saves the checkpoint as *incomplete epoch* (``trainer_state.batches_done``), so
  the resumed run continues with the next micro-batch; when the stop falls on the epoch's last update
  the epoch is finished normally (validation, epoch checkpoint) and the process exits after it, before
  the export;
* ``exit_process=False`` (library use, e.g. a notebook) does not exit: the trainer saves and returns.

The previous signal handlers are put back when the fit ends. Handlers can only be installed from the
main thread; elsewhere the hook logs a warning and does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Iterable

from decode_accel.training.hooks import Hook

logger = logging.getLogger("decode_accel.training")

#: exit codes after the pre-emption checkpoint, by signal
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 128 + int(signal.SIGINT)}


class PreemptionHook(Hook):
    """Save a checkpoint and exit cleanly when the process receives SIGTERM or SIGINT.

    Args:
        signals: the signals to catch (default SIGTERM and SIGINT).
        exit_process: raise ``SystemExit`` after the checkpoint (exit code 0 for SIGTERM, 130 for
            SIGINT); False only stops the training loop.

    Attributes:
        received: the signal number seen by this process (None before any).
        checkpoint: the folder of the pre-emption checkpoint once written (None before, or when the
            trainer has no checkpoint folder).
        exit_code: the exit code chosen when the pre-emption was acted upon.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT), exit_process: bool = True):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.exit_process = bool(exit_process)
        self.received: int | None = None
        self.checkpoint = None
        self.exit_code: int | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------ signal plumbing
    def _handler(self, signum, frame):  # noqa: ARG002 - the signal module's signature
        if os.getpid() != self._pid:
            # a forked DataLoader worker inherited the handler: the main process decides, the worker
            # keeps serving batches until the loader shuts it down
            return
        if self.received is not None and signum == signal.SIGINT:
            # the user insists: give up the checkpoint and interrupt now
            self.uninstall()
            raise KeyboardInterrupt
        self.received = int(signum)
        # os.write, not logging: a signal handler may interrupt a logging call holding its lock
        name = signal.Signals(signum).name
        msg = (f"decode_accel: received {name}; saving a checkpoint after the current optimizer update, then "
               f"exiting{' (press Ctrl-C again to abort without saving)' if signum == signal.SIGINT else ''}\n")
        try:
            os.write(2, msg.encode())
        except OSError:
            pass

    def install(self) -> bool:
        """Install the handlers (main thread only); returns whether they were installed."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionHook: not in the main thread, SIGTERM/SIGINT will not save a checkpoint")
            return False
        self._pid = os.getpid()
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        return True

    def uninstall(self) -> None:
        """Put the handlers that were there before ``install`` back."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    # ------------------------------------------------------------------ hook events
    def on_fit_start(self, trainer):
        self.received, self.checkpoint, self.exit_code = None, None, None
        self.install()

    def on_step_end(self, trainer, losses):
        # a flag for the trainer, which agrees on it with the other processes and writes the checkpoint
        if self.received is not None and self.exit_code is None:
            self.exit_code = EXIT_CODES.get(self.received, 0)
            name = signal.Signals(self.received).name
            trainer.request_stop(f"{name}: pre-empted at update {trainer.global_step}", immediate=True,
                                 exit_code=self.exit_code if self.exit_process else None)

    def on_fit_end(self, trainer, history):
        if trainer.stop_reason and trainer.exit_code is not None:
            self.exit_code = trainer.exit_code  # the code every process agreed on
        if self.received is not None or trainer.exit_code is not None:
            self.checkpoint = trainer.last_checkpoint if trainer.accelerator.is_main_process else None
            if self.checkpoint is not None:
                trainer.accelerator.print(f"decode_accel: checkpoint {self.checkpoint} written at epoch {trainer.epoch}, "
                                          f"update {trainer.global_step}; continue with --resume")
            elif trainer.checkpoint_manager is None:
                logger.warning("pre-empted but the trainer has no checkpoint folder (save_dir): nothing saved")
        self.uninstall()

    def state_dict(self) -> dict:
        # nothing to carry over: a resumed run starts without a pending signal
        return {}
