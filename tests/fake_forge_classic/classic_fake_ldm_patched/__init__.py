"""Marker: Forge Classic samples through `ldm_patched` (its older backend)."""
