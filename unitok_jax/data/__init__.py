"""Data layer: on-disk records, the embedded procedural dataset, transforms, tokenizers, Grain pipelines, ingestion.

Import submodules directly (``from unitok_jax.data import pipeline``); this package imports nothing heavy itself.
"""
