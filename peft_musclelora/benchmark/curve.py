"""The trusted-data curve: CACC and ASR of a GA method and `clean-only` against the number of trusted clean rows.

METHOD.md found the size of the trusted clean set to be the strongest knob of gradient alignment, and LoRA trained
on the trusted rows alone to be a strong baseline. `musclelora curve` runs both for several trusted-row counts
(`reference_split_size`: the same seeded rows for both, removed from dev) and writes `curve.json`, `curve.md` and
`curve.png` (one row of two panels per attack: CACC and ASR against trusted rows, one line per method).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

from .methods import results_heading

DEFAULT_SIZES = "32,96,200,400,800"
DEFAULT_CURVE_METHODS = "musclelora,clean-only"


def curve_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, method, trusted rows): mean and std over seeds of CACC, ASR, false-target rate, time.

    Example:
        >>> cells = [{"attack": "a", "method": "m", "trusted": 32, "seed": s, "status": "ok", "cacc": c, "asr": 0.5,
        ...           "false_target_rate": 0.1, "train_time_s": 2.0} for s, c in ((0, 0.8), (1, 0.9))]
        >>> row = curve_rows(cells)[0]
        >>> round(row["cacc"], 3), round(row["cacc_std"], 4), row["seeds"]
        (0.85, 0.0707, [0, 1])
    """
    keys: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for cell in cells:
        keys.setdefault((cell["attack"], cell["method"], cell["trusted"]), []).append(cell)
    rows = []
    for (attack, method, trusted), group in keys.items():
        ok = [c for c in group if c.get("status") == "ok"]
        row: dict[str, Any] = {
            "attack": attack,
            "method": method,
            "trusted": trusted,
            "seeds": [c["seed"] for c in ok],
        }
        for metric in ("cacc", "asr", "false_target_rate", "train_time_s"):
            values = [c[metric] for c in ok if c.get(metric) is not None]
            row[metric] = statistics.fmean(values) if values else None
            row[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else None
        row["status"] = "ok" if ok else next((c.get("status") for c in group), "error")
        row["note"] = None if ok else next((c.get("reason") or c.get("error") for c in group), None)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["attack"], r["method"], r["trusted"]))


def _pct(value: Optional[float], std: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def curve_table(rows: list[dict[str, Any]], preset: str, model: str, overrides: Optional[list[str]] = None) -> str:
    """The curve as a Markdown table (n/a and failed points give their reason; `--set` overrides are listed)."""
    lines = results_heading("Trusted-data curve", preset, overrides, "2000-row subsample, 2 epochs")
    lines += [
        f"Model: `{model}`. For each trusted-row count N, methods with gradient alignment use N clean-dev rows as "
        "references and `clean-only` trains LoRA on the same N rows alone; all remove them from dev. CACC, ASR, "
        "false-target rate in %, mean ± std over seeds.",
        "",
        "| attack | trusted rows | method | seeds | CACC | ASR | false-target rate | train time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['attack']} | {r['trusted']} | {r['method']} | {r['status']}: {r['note']} | | | | |")
            continue
        seconds = "–" if r["train_time_s"] is None else f"{r['train_time_s']:.1f}"
        lines.append(
            f"| {r['attack']} | {r['trusted']} | {r['method']} | {','.join(map(str, r['seeds']))} | "
            f"{_pct(r['cacc'], r['cacc_std'])} | {_pct(r['asr'], r['asr_std'])} | "
            f"{_pct(r['false_target_rate'], r['false_target_rate_std'])} | {seconds} |"
        )
    return "\n".join(lines) + "\n"


def plot_curve(rows: list[dict[str, Any]], path: Path, preset: str) -> None:
    """CACC and ASR against trusted rows, one line per method, one row of panels per attack (`plot` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "the curve plot needs matplotlib: install peft-musclelora[plot] (or pass --no-plot)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure, axes = plt.subplots(len(attacks), 2, figsize=(10, 3.5 * len(attacks)), squeeze=False)
    for i, attack in enumerate(attacks):
        for axis, metric, label in ((axes[i][0], "cacc", "CACC (%)"), (axes[i][1], "asr", "ASR (%)")):
            for method in methods:
                points = [r for r in rows if r["attack"] == attack and r["method"] == method and r[metric] is not None]
                xs = [r["trusted"] for r in points]
                ys = [100 * r[metric] for r in points]
                errors = [100 * (r[metric + "_std"] or 0.0) for r in points]
                axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=method)
            axis.set_xscale("log")
            sizes = sorted({r["trusted"] for r in rows if r["attack"] == attack})
            axis.set_xticks(sizes, [str(n) for n in sizes])  # the measured sizes, not log-scale decades
            axis.minorticks_off()
            axis.set_xlabel("trusted clean rows")
            axis.set_ylabel(label)
            axis.set_ylim(0, 100)
            axis.set_title(attack)
            axis.legend(fontsize="small")
    figure.suptitle("Trusted-data curve" + (" — QUICK preset (subsampled)" if preset == "quick" else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
