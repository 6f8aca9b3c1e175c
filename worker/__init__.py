"""recps.worker."""
