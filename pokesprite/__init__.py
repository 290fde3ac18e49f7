"""pokesprite: text-to-image latent diffusion for Pokemon sprites."""

__version__ = "0.1.0"
