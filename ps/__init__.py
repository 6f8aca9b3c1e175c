"""recps.ps."""
