"""ERASE: exact unlearning of in-context examples (quantized k-means). Not built yet; see issue 4."""
