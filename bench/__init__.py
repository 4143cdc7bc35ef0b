"""Streaming benchmark for chatbackend: ``python -m bench`` (see ``bench/README.md``)."""
