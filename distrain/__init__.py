"""distrain: distributed mini-batch training for PyTorch on Ray, configured with Hydra."""

__version__ = "0.1.0"
