"""Tests of rlkv.tasks (a package, so that its conftest does not shadow tests/conftest.py)."""
