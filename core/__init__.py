"""What every unlearning method shares: records and data sets, models, the store, the run lock,
stored runs, tombstones and receipts.

MKL (torch's CPU BLAS here) may pick a different code path for a matrix product
depending on how its buffers happen to be aligned in memory, so two processes running
the same single-threaded training can drift apart in the last bits (seen: the Ray
actors and the in-process engine disagreed on one shard of the demo). Conditional
Numerical Reproducibility in strict mode removes that dependence. It must be set
before MKL is loaded, so it is set on import of this package (every method package imports it first); a user's value wins.
"""
import os

os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
# cuBLAS needs a fixed workspace for deterministic GEMMs (runs with device cuda; no effect on CPU).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
