"""fedge.secagg."""
