"""Fake of Forge's `backend` package (see tests/fake_forge/README.md)."""
