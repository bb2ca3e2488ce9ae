"""prunepilot: post-training pruning for decoder-only LLMs."""
__version__ = "0.1.0"
