"""Inference: checkpoint loading, whole-volume sliding-window prediction, writing masks."""
