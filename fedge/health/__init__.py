"""fedge.health."""
