"""Linear warm-up, then cosine annealing with warm restarts (paper: 50 warm-up epochs)."""

from __future__ import annotations

import math

import lightning as L


def warm_restart_factor(t: float, warmup: float, period: float, period_mult: float, min_factor: float) -> float:
    """Learning-rate factor at time ``t`` (epochs or steps) since the schedule began."""
    if t < warmup:
        return (t + 1) / warmup
    t -= warmup
    while t >= period:
        t -= period
        period *= period_mult
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t / period))


class CosineWarmRestarts(L.Callback):
    """Sets every optimiser group's lr to ``lr * lr_scale * factor`` each epoch or step, and logs it.

    ``lr`` is the module's ``hparams.lr``; ``lr_scale`` an optional entry of the group (default 1).

    The schedule counts epochs (or steps) from the start of training through both phases: phase 2
    runs on along it although its optimiser is rebuilt, so a run whose last cycle ends with training
    trains its final weights at a low lr. (Until 2026-11-30 phase 2 restarted the schedule: the
    quickstart then ran its last 54 steps at the peak lr and ended there; README, "Phase 2 at the
    peak learning rate".)

    Args:
        warmup: warm-up length (paper: 50 epochs).
        period: length of the first cosine cycle.
        period_mult: each cycle is this many times longer than the previous one.
        min_factor: lowest lr as a fraction of the base lr.
        interval: ``epoch`` or ``step``.
    """

    def __init__(
        self,
        warmup: int = 50,
        period: int = 200,
        period_mult: float = 2.0,
        min_factor: float = 0.01,
        interval: str = "epoch",
    ) -> None:
        if interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step', got {interval!r}")
        if warmup < 1 or period < 1:
            raise ValueError("warmup and period must be at least 1")
        self.warmup, self.period, self.period_mult = warmup, period, period_mult
        self.min_factor, self.interval = min_factor, interval

    def _time(self, trainer: L.Trainer) -> float:
        return trainer.current_epoch if self.interval == "epoch" else trainer.global_step

    def _apply(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        factor = warm_restart_factor(self._time(trainer), self.warmup, self.period, self.period_mult, self.min_factor)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = module.hparams.lr * group.get("lr_scale", 1.0) * factor
        module.log("train/lr", module.hparams.lr * factor)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.interval == "epoch":
            self._apply(trainer, module)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if self.interval == "step":
            self._apply(trainer, module)
