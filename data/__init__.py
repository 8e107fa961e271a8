"""Dataset builders shipped with qilin-jax (TFDS: ChiMed-VL, PMC-VQA); the demo task and its tokenizer live in qilin_jax.demo_data."""
