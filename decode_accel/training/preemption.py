"""Graceful pre-emption: SIGTERM / SIGINT -> checkpoint at the next optimizer update, then a clean exit.

Clusters (SLURM, Kubernetes, spot instances) announce the end of a job with SIGTERM and kill it a
grace period later (typically 30 s to a few minutes). Without a handler Python dies at once and the
work since the last epoch checkpoint is lost. ``PreemptionHook`` turns the signal into a flag; the
training loop looks at the flag after each optimizer update (``on_step_end``), so the weights,
optimizer and data position it saves are those of a finished update, never of a half-done one.

Decisions:

* **synchronised across processes**: every process calls ``accelerator.set_trigger`` when it saw a
  signal and ``accelerator.check_trigger`` (an all-reduce) at every update end, so all ranks stop at
  the same update even when the launcher signalled only some of them (a rank that left alone would
  hang the others in the next collective);
* **SIGTERM** -> checkpoint, then ``SystemExit(0)``: the job was asked to stop and stopped correctly,
  so schedulers that requeue on success (or on a zero exit) resume it with ``--resume``;
* **SIGINT** (Ctrl-C) -> the same checkpoint, then ``SystemExit(130)`` (128 + SIGINT, the shell's code
  for "interrupted"), so a script can tell an interrupted run from a finished one. A *second* Ctrl-C
  before the checkpoint is written gives up on it and raises ``KeyboardInterrupt`` at once;
* mid-epoch the checkpoint is saved as *incomplete epoch* (``trainer_state.batches_done``), so the
  resumed run continues with the next micro-batch; when the signal arrives at the epoch's last update
  the epoch is finished normally (validation, epoch checkpoint) and the process exits after it, before
  the export;
* ``exit_process=False`` (library use, e.g. a notebook) does not exit: it saves and asks the trainer
  to stop after this micro-batch (``trainer.request_stop(immediate=True)``).

The previous signal handlers are put back when the fit ends. Handlers can only be installed from the
main thread; elsewhere the hook logs a warning and does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Iterable

import torch

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
        self._exit_after_epoch = False
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
        self.received, self.checkpoint, self.exit_code, self._exit_after_epoch = None, None, None, False
        self.install()

    def on_step_end(self, trainer, losses):
        acc = trainer.accelerator
        if self.received is not None:
            acc.set_trigger()
        # every process takes part in the all-reduce at every update, signalled or not
        if not acc.check_trigger():
            return
        signum = self._agreed_signal(trainer)
        self.exit_code = EXIT_CODES.get(signum, 0)
        name = signal.Signals(signum).name
        last_of_epoch = trainer.batch_idx + 1 >= trainer.batches_per_epoch
        if last_of_epoch:
            # let the loop finish the epoch (validation + epoch checkpoint) and stop after it
            self._exit_after_epoch = self.exit_process
            trainer.request_stop(f"{name}: stopping after this epoch's checkpoint")
            return
        if trainer.checkpoint_manager is not None:
            self.checkpoint = trainer.save_checkpoint(metrics=None, epoch_complete=False)
            acc.print(f"decode_accel: {name}: checkpoint {self.checkpoint} written at epoch {trainer.epoch}, "
                      f"update {trainer.global_step}; continue with --resume")
        else:
            logger.warning("%s received but the trainer has no checkpoint folder (save_dir): nothing saved", name)
        if self.exit_process:
            self._exit(trainer)
        trainer.request_stop(f"{name}: pre-empted at update {trainer.global_step}", immediate=True)

    def on_fit_end(self, trainer, history):
        if self._exit_after_epoch:
            if trainer.checkpoint_manager is not None:
                self.checkpoint = trainer.checkpoint_manager.latest_complete() \
                    if trainer.accelerator.is_main_process else None
            self._exit(trainer)
        self.uninstall()

    # ------------------------------------------------------------------ helpers
    def _agreed_signal(self, trainer) -> int:
        """SIGINT if any process saw SIGINT, else SIGTERM: all processes exit with the same code."""
        acc = trainer.accelerator
        saw_int = torch.tensor(1.0 if self.received == signal.SIGINT else 0.0, device=acc.device)
        if acc.num_processes > 1:
            saw_int = acc.reduce(saw_int, reduction="sum")
        return int(signal.SIGINT) if float(saw_int) > 0 else int(signal.SIGTERM)

    def _exit(self, trainer):
        self.uninstall()
        trainer.accelerator.wait_for_everyone()
        logger.warning("pre-empted: exiting with code %d after the checkpoint", self.exit_code)
        raise SystemExit(self.exit_code)

    def state_dict(self) -> dict:
        # nothing to carry over: a resumed run starts without a pending signal
        return {}
