"""fedge.update."""
