"""mixload."""
