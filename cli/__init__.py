"""recps.cli."""
