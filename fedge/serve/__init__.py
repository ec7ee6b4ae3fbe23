"""fedge.serve."""
