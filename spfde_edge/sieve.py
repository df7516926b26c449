"""Circular data sieving. One numpy implementation serves host and device: it lives in the
torch-free ``device_runner`` package (which imports nothing from here) and is re-exported."""
from device_runner.sieve import (REDUCTIONS, DataSieve, SieveError, SieveUpdate,
                                 merge_interval_states)

__all__ = ["REDUCTIONS", "DataSieve", "SieveError", "SieveUpdate", "merge_interval_states"]
