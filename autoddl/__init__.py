"""autoddl: provably optimal parallelization plans for PyTorch training, and their runtime."""

__version__ = "0.1.0"
