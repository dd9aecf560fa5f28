"""Marker: Forge Classic ships `modules_forge`."""
