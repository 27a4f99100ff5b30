"""Dynamic task prioritisation: tasks the model has not learned yet weigh more in the loss."""

from __future__ import annotations

import torch


class TaskPriorities:
    """Each (image, prompt) pair's loss weight from its task's running training soft Dice ``d``:
    ``(1 - d) ** exponent``, normalised to mean 1 over the batch's pairs (task-level focal weighting,
    Guo et al., "Dynamic Task Prioritization for Multitask Learning", ECCV 2018).

    A task learned well lends its share of the shared encoder's and sub-pathways' gradient to the
    tasks still missed, and takes it back when its Dice falls; the weight scales a pair's whole loss,
    so what each task is asked to segment does not change, only how the tasks share the network.
    ``d`` is an exponential moving average (``momentum`` per update) of the soft Dice of the task's
    pairs whose target holds the structure, starting at 0 (every task alike).

    Args:
        exponent: how sharply the weights follow difficulty (0: every pair alike).
        momentum: share of the previous running Dice kept at each update.
    """

    def __init__(self, exponent: float, momentum: float = 0.9) -> None:
        if exponent < 0:
            raise ValueError(f"task priority exponent must be >= 0, got {exponent}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"task priority momentum must lie in [0, 1), got {momentum}")
        self.exponent, self.momentum = exponent, momentum
        self.dice: dict[str, float] = {}

    def difficulty(self, prompts: list[str]) -> torch.Tensor:
        """``(1 - d) ** exponent`` per prompt (N,), ``1 - d`` floored at 0.001; an unseen task's is 1."""
        return torch.tensor([1.0 - self.dice.get(p, 0.0) for p in prompts]).clamp(min=1e-3) ** self.exponent

    def weights(self, prompts: list[str]) -> torch.Tensor:
        """One weight per pair (N,), mean 1 (all 1 where a steep exponent rounds every difficulty to 0)."""
        difficulty = self.difficulty(prompts)
        total = difficulty.mean()
        return difficulty / total if total > 0 else torch.ones_like(difficulty)

    def update(self, prompts: list[str], soft_dice: torch.Tensor, present: torch.Tensor) -> None:
        """Fold each present pair's soft Dice (N,) into its task's running value."""
        for prompt, value, holds in zip(prompts, soft_dice.tolist(), present.tolist()):
            if holds:
                self.dice[prompt] = self.momentum * self.dice.get(prompt, 0.0) + (1 - self.momentum) * value

    def state_dict(self) -> dict[str, float]:
        return dict(self.dice)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.dice = dict(state)
