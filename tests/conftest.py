"""Fixtures every test directory may use."""

pytest_plugins = ["tests.shm_objects"]  # shm: shared-memory objects under /dev/shm
