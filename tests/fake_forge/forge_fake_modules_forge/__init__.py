"""Marker package: Forge ships `modules_forge`; GCFG's host detection looks for it."""
