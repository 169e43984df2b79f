"""Set-based image-text retrieval with diverse embeddings (DivE) at cluster scale."""

__version__ = "0.1.0"
