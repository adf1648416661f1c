"""Inference workers: RQ worker classes and the decoders they run."""
