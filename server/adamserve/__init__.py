"""adamserve: the Adam family of optimizers as a stateful service."""

__version__ = "0.1.0"
