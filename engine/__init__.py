"""Distributed embedding and catalogue-scale inference for astronomy."""

__version__ = "0.1.0"
