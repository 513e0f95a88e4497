"""fastmae: the published Masked Autoencoder, trained fast."""

__version__ = "0.1.0"
