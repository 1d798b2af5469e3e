"""jest_jax: joint example selection (JEST) for SigLIP image-text pretraining in JAX."""

__version__ = "0.1.0"
