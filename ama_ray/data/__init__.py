"""Preference data: the offline benchmark (`benchmark`), file readers (`readers`) and the
normalisation of real-world layouts to prompt/chosen/rejected (`formats`).

Submodules are imported explicitly (``from ama_ray.data import benchmark``) so that the
benchmark does not pull in pyarrow, datasets or transformers.
"""
