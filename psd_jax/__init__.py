"""psd_jax: pre-train CLIP-style dual encoders with Progressive Self-Distillation in JAX."""

__version__ = '0.1.0'
