"""Test support shared by every test package (fixtures are in tests/conftest.py)."""
