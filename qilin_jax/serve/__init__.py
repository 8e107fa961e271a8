"""Serving: a continuous-batching engine (`engine`), an OpenAI-compatible HTTP API and a web
chat page (`api`), and their settings (`config`, the `serve:` section of a run config)."""
