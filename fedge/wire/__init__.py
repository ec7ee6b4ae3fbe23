"""fedge.wire."""
