"""Bundled demo task: synthetic medical-style images with Chinese captions and VQA."""
