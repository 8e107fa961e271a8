"""TFDS builder for PMC-VQA (CSV + figure folder)."""
