"""recps.serving."""
