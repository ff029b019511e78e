"""bdguard: train clean models on poisoned data, remove backdoors, and measure both."""

__version__ = "0.1.0"
