"""sdjax: Dropout and Stochastic Depth for JAX/Flax."""

__version__ = "0.2.0"
