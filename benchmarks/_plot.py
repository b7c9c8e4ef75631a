"""Shared plotting helper of the benchmark scripts: matplotlib is optional (the ``bench`` extra)."""


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None after one printed line saying the
    PNG is skipped when matplotlib is not installed (the tables and JSON do not need it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG (pip install -e \".[bench]\" or pip install matplotlib)",
              flush=True)
        return None
    return plt
