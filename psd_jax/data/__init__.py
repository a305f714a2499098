"""The input side: tokenizers, data fetching, tfds builders and grain pipelines."""
