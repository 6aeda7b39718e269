"""ERASE: exact unlearning of in-context examples, chosen by quantized k-means over embeddings."""
import core  # noqa: F401  (MKL reproducibility settings before torch loads)
