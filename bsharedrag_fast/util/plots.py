"""The package's PNG figures: matplotlib (the optional `plots` extra) on its file-only Agg
backend, imported on first use so that nothing else pays for it."""
from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, dpi: int = 120) -> str:
    """Lay out, write and close `fig`; returns path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
