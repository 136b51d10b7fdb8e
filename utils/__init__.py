"""Helpers shared by test.py, train.py and the tests: images, checkpoints, devices, losses."""
