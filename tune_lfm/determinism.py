"""The same trial config gives the same numbers, whichever Ray worker runs it and whatever ran there before.

Ray reuses a worker process for the next trial, so anything a trial leaves behind in the process (the global random
generators, torch's thread count, algorithm choices) would otherwise leak into the next trial's numbers.
`start_trial` resets all of it at the beginning of each trial.
"""

from __future__ import annotations

import random


def start_trial(seed: int, threads: int) -> None:
    """Seed Python, NumPy and torch, fix torch's intra-op threads, and ask for deterministic kernels on CPU.

    The thread count matters for bit-identical results: CPU reductions split their work by thread. CUDA keeps its
    fast kernels (deterministic CUDA algorithms need a cuBLAS workspace setting and cost speed).
    """
    import numpy as np
    import torch

    torch.set_num_threads(max(1, threads))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
