"""nanosuno: a small, fast, readable music language model (Encodec tokens + a causal transformer)."""
__version__ = "0.1.0"
