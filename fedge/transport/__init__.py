"""fedge.transport."""
