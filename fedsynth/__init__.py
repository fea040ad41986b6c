"""fedsynth: privacy-preserving federated synthetic data."""

__version__ = "0.1.0"
