"""Figures of a frequency log (see [`peft_musclelora.frequency`]): heatmaps, error curves, and a comparison.

matplotlib is optional (the `plot` extra) and imported only when a figure is drawn, with the Agg backend, so the
functions work on machines without a display. Every function takes a log (a run directory, a `frequency_log.json`
path or a loaded log dict) and an output path, and returns the path written.

Example:

```py
>>> from peft_musclelora.plotting import plot_frequency_heatmap, plot_error_curves
>>> plot_frequency_heatmap("runs/freq-badnets-lora", "figures/badnets-lora-heatmap.png")  # doctest: +SKIP
PosixPath('figures/badnets-lora-heatmap.png')
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .frequency import ERROR_NAMES, _nearest_delta_index, load_frequency_log

LogLike = Union[str, os.PathLike, Mapping[str, Any]]

PANEL_TITLES = {
    "backdoor_low": "Backdoor Low",
    "clean_low": "Clean Low",
    "backdoor_high": "Backdoor High",
    "clean_high": "Clean High",
}
CURVE_STYLES = {
    "backdoor_low": {"color": "tab:red", "linestyle": "-"},
    "clean_low": {"color": "tab:blue", "linestyle": "-"},
    "backdoor_high": {"color": "tab:red", "linestyle": "--"},
    "clean_high": {"color": "tab:blue", "linestyle": "--"},
}


def pyplot(what: str = "Plotting frequency logs") -> Any:
    """`matplotlib.pyplot` on the Agg backend; an `ImportError` saying that `what` needs the `plot` extra if absent."""
    try:
        import matplotlib  # optional: the `plot` extra
    except ImportError as error:
        raise ImportError(
            f"{what} needs matplotlib: install the `plot` extra, `pip install peft-musclelora[plot]`."
        ) from error
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def prepare_path(output_path: Union[str, os.PathLike]) -> Path:
    """`output_path` as a `Path`, its directory created."""
    path = Path(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(figure: Any, output_path: Union[str, os.PathLike], dpi: int = 120) -> Path:
    """Lay out, write and close `figure`; returns the path written."""
    path = prepare_path(output_path)
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path


def _matrix(log: Mapping[str, Any], name: str) -> np.ndarray:
    return np.array([record[name] for record in log["records"]], dtype=float)


def _steps(log: Mapping[str, Any]) -> np.ndarray:
    return np.array([record["step"] for record in log["records"]], dtype=float)


def _delta_index(log: Mapping[str, Any], delta: Optional[float]) -> int:
    if delta is None:
        delta = log.get("summary_delta")
    return _nearest_delta_index(log["deltas"], delta)


def plot_frequency_heatmap(
    log: LogLike,
    output_path: Union[str, os.PathLike],
    title: Optional[str] = None,
    shared_scale: bool = False,
    dpi: int = 110,
) -> Path:
    """Four panels (Backdoor Low, Clean Low, Backdoor High, Clean High): step x delta, colour = relative error.

    By default each panel has its own colour scale, so the change over the steps is visible even where one error
    moves within a narrow band; `shared_scale=True` puts all four on one scale to compare their levels.
    """
    plt = pyplot()
    data = load_frequency_log(log)
    path = prepare_path(output_path)
    steps, deltas = _steps(data), np.array(data["deltas"], dtype=float)
    matrices = {name: _matrix(data, name) for name in ERROR_NAMES}
    finite = np.concatenate([m[np.isfinite(m)] for m in matrices.values()])
    limits = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True, sharey=True, constrained_layout=True)
    image = None
    for ax, name in zip(axes.flat, ERROR_NAMES):
        vmin, vmax = limits if shared_scale else (None, None)
        image = ax.pcolormesh(deltas, steps, matrices[name], shading="nearest", vmin=vmin, vmax=vmax, cmap="viridis")
        ax.set_title(PANEL_TITLES[name])
        if not shared_scale:
            fig.colorbar(image, ax=ax, format="%.3g")
    for ax in axes[1]:
        ax.set_xlabel("delta (kernel width)")
    for ax in axes[:, 0]:
        ax.set_ylabel("step")
    if shared_scale:
        fig.colorbar(image, ax=axes, label="relative error", shrink=0.9)
    fig.suptitle(f"{title + ': ' if title else ''}relative error")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _draw_curves(
    ax: Any, data: Mapping[str, Any], index: int, relative_to_start: bool = False, with_accuracy: bool = True
) -> None:
    steps = _steps(data)
    for name in ERROR_NAMES:
        values = _matrix(data, name)[:, index]
        if relative_to_start:
            values = values / values[0] if values[0] != 0 else np.full_like(values, np.nan)
        ax.plot(steps, values, label=PANEL_TITLES[name], marker=".", **CURVE_STYLES[name])
    if with_accuracy and all("clean_acc" in r and "backdoor_asr" in r for r in data["records"]):
        ax.plot(steps, [r["clean_acc"] for r in data["records"]], color="tab:blue", alpha=0.4, lw=3, label="clean acc")
        ax.plot(steps, [r["backdoor_asr"] for r in data["records"]], color="tab:red", alpha=0.4, lw=3, label="ASR")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def plot_error_curves(
    log: LogLike,
    output_path: Union[str, os.PathLike],
    delta: Optional[float] = None,
    title: Optional[str] = None,
    relative_to_start: bool = False,
    dpi: int = 110,
) -> Path:
    """The four relative errors over the steps at one delta (default: the log's summary delta), with the clean
    accuracy and the attack success rate on the same samples drawn faintly for reference.

    `relative_to_start=True` divides each error by its value at the first record, so curves that start at different
    levels can be compared by how fast they fall (which mapping converges first)."""
    plt = pyplot()
    data = load_frequency_log(log)
    path = prepare_path(output_path)
    index = _delta_index(data, delta)
    fig, ax = plt.subplots(figsize=(8.5, 4.5), constrained_layout=True)
    _draw_curves(ax, data, index, relative_to_start)
    ax.set_ylabel(("error / error at start" if relative_to_start else "relative error") + "; accuracy")
    ax.set_title(f"{title + ': ' if title else ''}delta = {data['deltas'][index]:.2f}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_comparison(
    log: LogLike,
    other_log: LogLike,
    output_path: Union[str, os.PathLike],
    labels: tuple[str, str] = ("LoRA", "MuScleLoRA"),
    delta: Optional[float] = None,
    title: Optional[str] = None,
    relative_to_start: bool = False,
    dpi: int = 110,
) -> Path:
    """Two logs side by side (e.g. undefended LoRA vs MuScleLoRA on one attack): error curves at one delta, same
    y-axis; `relative_to_start` as in [`plot_error_curves`]."""
    plt = pyplot()
    logs = (load_frequency_log(log), load_frequency_log(other_log))
    path = prepare_path(output_path)
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 4.5), sharey=not relative_to_start, constrained_layout=True)
    for ax, data, label in zip(axes, logs, labels):
        index = _delta_index(data, delta)
        _draw_curves(ax, data, index, relative_to_start)
        ax.set_title(f"{label} (delta = {data['deltas'][index]:.2f})")
    axes[0].set_ylabel(("error / error at start" if relative_to_start else "relative error") + "; accuracy")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


__all__ = ["plot_comparison", "plot_error_curves", "plot_frequency_heatmap"]
