"""Datasets shipped with qilin-jax: builders, the bundled demo task and the demo tokenizer."""
