"""Marker: `ldm_patched.modules.samplers` holds Forge Classic's sampling function."""
