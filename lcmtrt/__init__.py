"""lcmtrt: a TensorRT-compiled runtime for Latent Consistency Models."""

__version__ = "0.1.0"
