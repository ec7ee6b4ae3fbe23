"""fedge.agent."""
