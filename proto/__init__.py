"""recps.proto."""
