"""Data: phantoms, readers, the registry, the shared preprocessing and the multi-task DataModule."""
