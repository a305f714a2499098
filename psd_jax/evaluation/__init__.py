"""Evaluators: embedding extraction and retrieval (zero-shot and linear probe build on them)."""
