"""Segmentation metrics of the paper (Dice, clDice, topology precision/sensitivity) and statistics."""

from metrics.segmentation import cl_dice, dice, topology_precision, topology_sensitivity

__all__ = ["cl_dice", "dice", "topology_precision", "topology_sensitivity"]
