"""SISA: sharded, isolated, sliced, aggregated training of LoRA classifiers, exact under deletion."""
