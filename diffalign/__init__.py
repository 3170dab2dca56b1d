"""diffalign: preference alignment for diffusion and language models on one loss core."""

__version__ = "0.1.0"
