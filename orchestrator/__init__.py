"""The Sidemesh orchestrator (under construction)."""
