"""fewclip: few-shot adaptation of CLIP on cached features, with honest hyperparameter selection."""

__version__ = "0.1.0"
