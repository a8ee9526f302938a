"""igd: interpretability-guided test-time adversarial defence (Kulkarni & Weng, ECCV 2024) as a toolkit."""

__version__ = "0.1.0"
