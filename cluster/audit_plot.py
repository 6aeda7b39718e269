"""A chart of an audit: knowledge of the forget set and utility, membership AUC, and the
attacks, one bar per run."""
from __future__ import annotations

import os

from core.errors import UnlearnError


def check_plot_path(path: str) -> None:
    """Before an audit runs (minutes): a file name whose extension matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1][1:].lower()
    if ext and ext not in FigureCanvasBase.get_supported_filetypes():
        raise UnlearnError(f"--plot {path}: cannot write a {ext!r} image (use .png, .svg or .pdf)")


def plot_audit(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [out["subject"]] + ([out["reference"]] if "reference" in out else [])
    panels = [
        ("knowledge: exact match", [("forget", lambda r: r["knowledge"]["forget"]["exact_match"]),
                                    ("retain", lambda r: r["knowledge"]["retain"]["exact_match"]),
                                    ("holdout", lambda r: r["knowledge"]["holdout"]["exact_match"])]),
        ("membership AUC (forget vs holdout)", [(k, lambda r, k=k: r["membership"][f"{k}_auc"])
                                                for k in ("loss", "zlib", "min_k")]),
        ("attacks: forget exact match", [("relearned", lambda r: r["relearn"]["after"]["exact_match"]),
                                         ("8-bit", lambda r: r["quantization"]["8bit"]["forget"]["exact_match"]),
                                         ("4-bit", lambda r: r["quantization"]["4bit"]["forget"]["exact_match"])]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    width = 0.8 / len(reports)
    for ax, (title, bars) in zip(axes, panels):
        for i, r in enumerate(reports):
            values = []
            for _name, get in bars:
                try:
                    values.append(get(r) or 0.0)
                except (KeyError, TypeError):
                    values.append(0.0)
            ax.bar([j + i * width for j in range(len(bars))], values, width, label=r["run"])
        ax.set_xticks([j + width * (len(reports) - 1) / 2 for j in range(len(bars))], [b[0] for b in bars])
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as exc:  # ValueError: a format matplotlib does not write
        raise UnlearnError(f"--plot {path}: cannot write ({getattr(exc, 'strerror', None) or exc})") from None
    finally:
        plt.close(fig)
