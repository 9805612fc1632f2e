"""Benchmarks behind ``agentsd bench``: speed (UNet forwards) of vanilla, ToMe and agent attention."""
