"""Models built from GrowableDense."""
