"""Models: the embedded tiny model, a fetched SmolLM2-135M, and loading any model by name."""
