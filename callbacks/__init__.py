"""Lightning callbacks: learning-rate schedule, routing heat map, overlays, trimmed-model export."""

from callbacks.lr_schedule import CosineWarmRestarts
from callbacks.overlays import SegmentationOverlays
from callbacks.pruning_export import PruningExport
from callbacks.routing_map import RoutingHeatmap

__all__ = ["CosineWarmRestarts", "PruningExport", "RoutingHeatmap", "SegmentationOverlays"]
