"""fedge.coordinator."""
