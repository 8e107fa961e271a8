"""TFDS builder for ChiMed-VL (text from the Qilin-Med-VL release, images from PMC-OA)."""
