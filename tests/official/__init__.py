"""Transcriptions of the official DINOv2 / DINOv3 modules, used as numerical oracles by the tests."""
