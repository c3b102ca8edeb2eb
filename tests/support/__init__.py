"""Test helpers shared by unit and integration tests: in-process servers and fault scripts."""
