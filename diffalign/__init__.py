"""diffalign: align text-to-image diffusion models with rewards and human feedback."""

__version__ = "0.1.0"
