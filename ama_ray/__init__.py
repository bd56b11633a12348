"""ama_ray: AutoMixAlign (arXiv 2506.00569) as a Ray application."""

__version__ = "0.1.0"
