"""autoddl: provably optimal parallelization plans for PyTorch training, and their runtime."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``autoddl.plan`` (see :mod:`autoddl.api`), imported on first use: ``import autoddl``
    stays light for the command line."""
    if name == "plan":
        from autoddl.api import plan

        return plan
    raise AttributeError(f"module 'autoddl' has no attribute {name!r}")
