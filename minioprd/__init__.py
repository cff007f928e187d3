"""minioprd: On-Policy Representation Distillation (arXiv 2606.06021) for one consumer GPU."""

__version__ = "0.1.0"

from minioprd.errors import ConfigError, MinioprdError  # noqa: E402

__all__ = ["ConfigError", "MinioprdError", "__version__"]
