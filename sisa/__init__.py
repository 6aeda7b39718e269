"""SISA: sharded, isolated, sliced, aggregated training of LoRA classifiers, exact under deletion."""
import core  # noqa: F401  (MKL reproducibility settings before torch loads)
