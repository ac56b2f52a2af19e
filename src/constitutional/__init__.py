"""constitutional: Constitutional AI (Bai et al. 2022, arXiv:2212.08073) on any causal language model."""

__version__ = "0.1.0"
