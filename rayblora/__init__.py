"""rayblora: Bayesian LoRA fine-tuning of LLMs (ensembles, SWAG, Laplace, hybrid adapters) orchestrated on Ray."""

__version__ = "0.1.0"


def load_posterior(path, *args, **kwargs):
    """Load and verify a posterior artifact directory (see :func:`rayblora.artifact.load_posterior`)."""
    from rayblora.artifact import load_posterior as _load

    return _load(path, *args, **kwargs)


__all__ = ["__version__", "load_posterior"]
