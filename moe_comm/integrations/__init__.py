"""Adapters that make third-party MoE models expert-parallel through :mod:`moe_comm`."""

__all__ = ["transformers"]
