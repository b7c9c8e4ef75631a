"""Shared timing helper of the benchmark scripts."""
import statistics
import time


def median_time(fn, reps: int, warmup: int = 1, sync=lambda: None) -> float:
    """Median wall time of fn() in milliseconds over reps runs after warmup runs
    (sync is called before each clock read, e.g. torch.cuda.synchronize)."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
