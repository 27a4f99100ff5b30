"""Dynamic task prioritisation: weights from running Dice, hand-computed."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.task_priorities import TaskPriorities


def test_weights_follow_one_minus_running_dice_normalised_to_mean_one():
    priorities = TaskPriorities(exponent=1.0)
    priorities.dice = {"liver": 0.75, "liver tumor": 0.0}
    # difficulties 0.25, 1, 1 (a task never seen counts as unlearned): mean 0.75
    weights = priorities.weights(["liver", "liver tumor", "aorta"])
    assert torch.allclose(weights, torch.tensor([1 / 3, 4 / 3, 4 / 3]))
    priorities.exponent = 2.0
    squared = priorities.weights(["liver", "liver tumor"])
    assert torch.allclose(squared, torch.tensor([0.0625, 1.0]) / 0.53125)


def test_update_averages_only_the_pairs_that_hold_their_structure():
    priorities = TaskPriorities(exponent=1.0, momentum=0.9)
    priorities.dice = {"liver": 0.75}
    priorities.update(
        ["liver", "liver tumor", "aorta"], torch.tensor([0.5, 0.9, 0.3]), torch.tensor([True, False, True])
    )
    assert priorities.dice["liver"] == pytest.approx(0.9 * 0.75 + 0.1 * 0.5)
    assert priorities.dice["aorta"] == pytest.approx(0.1 * 0.3)  # from 0
    assert "liver tumor" not in priorities.dice
    restored = TaskPriorities(exponent=1.0)
    restored.load_state_dict(priorities.state_dict())
    assert restored.dice == priorities.dice and restored.dice is not priorities.dice


@pytest.mark.parametrize("exponent, momentum", [(-1.0, 0.9), (1.0, 1.0), (1.0, -0.1)])
def test_bad_settings_are_refused(exponent, momentum):
    with pytest.raises(ValueError, match="task priority"):
        TaskPriorities(exponent, momentum)


def test_a_steep_exponent_that_rounds_every_difficulty_to_zero_weighs_pairs_alike():
    priorities = TaskPriorities(exponent=20.0)  # 0.001 ** 20 is 0 in float32
    priorities.dice = {"liver": 1.0, "lung": 1.0}
    assert torch.equal(priorities.difficulty(["liver", "lung"]), torch.zeros(2))
    assert torch.equal(priorities.weights(["liver", "lung"]), torch.ones(2))
