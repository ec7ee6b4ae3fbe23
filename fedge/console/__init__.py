"""fedge.console."""
