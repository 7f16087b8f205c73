"""rlhf: close the human-feedback loop around a foundation model."""

__version__ = "0.1.0"
