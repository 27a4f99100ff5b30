"""LightningModules: training logic around the plain networks."""
