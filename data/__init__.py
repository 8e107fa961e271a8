"""TFDS dataset builders (ChiMed-VL, PMC-VQA); the demo task and its tokenizer are qilin_jax.demo_data."""
