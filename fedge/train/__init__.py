"""fedge.train."""
