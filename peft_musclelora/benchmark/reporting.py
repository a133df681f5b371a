"""Reporting: aggregate finished cells over seeds, write the Markdown tables, draw the figures.

The bench's attack x method table ([`aggregate`], [`markdown_table`], [`plot`]) and the trusted-data curve
([`curve_rows`], [`curve_table`], [`plot_curve`]) share the statistics ([`mean_std`]), the number format ([`pct`]),
the heading ([`results_heading`]) and the figure set-up of [`peft_musclelora.plotting`] (matplotlib, the `plot`
extra, imported only when a figure is drawn).

Example:
    >>> pct(0.8512, 0.0123), pct(None)
    ('85.1 ± 1.2', '–')
    >>> cells = [{"attack": "a", "method": "m", "trusted": 32, "seed": s, "status": "ok", "cacc": c, "asr": 0.5,
    ...           "false_target_rate": 0.1, "train_time_s": 2.0} for s, c in ((0, 0.8), (1, 0.9))]
    >>> row = curve_rows(cells)[0]
    >>> round(row["cacc"], 3), round(row["cacc_std"], 4), row["seeds"]
    (0.85, 0.0707, [0, 1])
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

from peft_musclelora.plotting import pyplot, save_figure

METRICS = ("cacc", "asr", "false_target_rate", "train_time_s")


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (None for fewer than two values; both None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pct(value: Optional[float], std: Optional[float] = None) -> str:
    """A share as a percentage with one decimal, `± std` when given; `–` for None."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _figure_pyplot(what: str) -> Any:
    try:
        return pyplot(what)
    except ImportError as error:
        raise ValueError(f"{error} (or pass --no-plot)") from None


def results_heading(kind: str, preset: str, overrides: Optional[list[str]], quick_note: str) -> list[str]:
    """First lines of a results page: what produced it (`musclelora bench --preset`, and any `--set` overrides).

    A quick run is labelled with `quick_note`; a run with overrides lists them, so a subsample is never shown as the
    presets as defined.
    """
    if preset == "quick":
        title = f"QUICK PRESET ({quick_note})"
    else:
        title = "method presets with overrides" if overrides else "method presets as defined"
    lines = [f"# {kind} ({title})", ""]
    if overrides:
        lines += ["Overrides (`--set`): " + ", ".join(f"`{item}`" for item in overrides) + ".", ""]
    return lines


DEFENSE_FIELDS = ("rows_removed", "poisoned_recall", "removal_precision", "frr", "triggered_flagged_rate")


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, method): mean and std over seeds of CACC, ASR, false-target rate and train time.

    Also: `excess_asr` (ASR minus the `oracle` row's ASR on the same attack, when that row exists),
    `time_ratio_to_lora` (train time over the `lora` row's on the same attack; for a defense without a `lora` row,
    the mean over seeds of its time over the undefended training it built on), the defense's own fields averaged
    over seeds, and `na_reason` when no seed could run because the data lacks what the method needs.
    """
    rows: list[dict[str, Any]] = []
    order = {}
    for i, c in enumerate(cells):
        order.setdefault((c["attack"], c["method"]), i)
    for attack, method in sorted(order, key=order.__getitem__):
        group = [c for c in cells if c["attack"] == attack and c["method"] == method]
        ok = [c for c in group if c.get("status") == "ok"]
        row: dict[str, Any] = {"attack": attack, "method": method, "seeds": [c["seed"] for c in ok]}
        row["errors"] = [c["error"] for c in group if c.get("status") == "error"]
        reasons = list(dict.fromkeys(c["reason"] for c in group if c.get("status") == "n/a"))
        row["na_reason"] = "; ".join(reasons) if reasons and not ok else None
        for metric in METRICS:
            row[metric], row[metric + "_std"] = mean_std([c[metric] for c in ok if c.get(metric) is not None])
        defense = {}
        for key in DEFENSE_FIELDS:
            values = [
                c["defense"][key]
                for c in ok
                if isinstance(c.get("defense"), dict) and c["defense"].get(key) is not None
            ]
            if values:
                defense[key] = statistics.fmean(values)
        row["defense"] = defense
        own = [c["train_time_s"] / c["undefended_train_time_s"] for c in ok if c.get("undefended_train_time_s")]
        row["_own_ratio"] = statistics.fmean(own) if own else None
        rows.append(row)
    for row in rows:
        same_attack = {r["method"]: r for r in rows if r["attack"] == row["attack"]}
        lora, oracle = same_attack.get("lora"), same_attack.get("oracle")
        ratio = row.pop("_own_ratio")
        if lora and lora["train_time_s"] and row["train_time_s"] is not None:
            ratio = row["train_time_s"] / lora["train_time_s"]
        row["time_ratio_to_lora"] = ratio
        excess = None
        if oracle and oracle["asr"] is not None and row["asr"] is not None:
            excess = row["asr"] - oracle["asr"]
        row["excess_asr"] = excess
    return rows


def _defense_summary(defense: dict[str, float]) -> str:
    parts = []
    if "rows_removed" in defense:
        parts.append(f"removed {defense['rows_removed']:.0f}")
    if "poisoned_recall" in defense:
        parts.append(f"poison recall {pct(defense['poisoned_recall'])}")
    if "removal_precision" in defense:
        parts.append(f"precision {pct(defense['removal_precision'])}")
    if "frr" in defense:
        parts.append(f"FRR {pct(defense['frr'])}")
    if "triggered_flagged_rate" in defense:
        parts.append(f"triggered flagged {pct(defense['triggered_flagged_rate'])}")
    return ", ".join(parts) or "–"


def data_note(task: str, cells: list[dict[str, Any]], target_label: int) -> Optional[str]:
    """`Data: task ..., K labels, target ...` for a table of another task than SST-2 or of more than two labels; None
    for the binary SST-2 tables (their text is as it always was)."""
    counts = sorted({int(c["num_labels"]) for c in cells if c.get("num_labels") is not None})
    names = next((c["label_names"] for c in cells if c.get("label_names")), None)
    if task == "sst-2" and counts in ([], [2]):
        return None
    shown = "/".join(str(k) for k in counts) or "?"
    target = f"{target_label} ({names[target_label]})" if names and target_label < len(names) else str(target_label)
    named = f" ({', '.join(f'{i}={n}' for i, n in enumerate(names))})" if names else ""
    return f"Data: task `{task}`, {shown} labels{named}, target label {target}."


def markdown_table(
    rows: list[dict[str, Any]],
    preset: str,
    model: str,
    overrides: Optional[list[str]] = None,
    data: Optional[str] = None,
) -> str:
    """The attack x method table in Markdown; a quick run or `--set` overrides are labelled as such, an n/a row gives
    its reason; `data` (see [`data_note`]) names the task and labels."""
    lines = results_heading(
        "MuScleLoRA backdoor benchmark",
        preset,
        overrides,
        "2000-row subsample, 2 epochs; not comparable to published numbers",
    )
    lines += [
        f"Model: `{model}`. CACC, ASR, excess ASR and false-target rate in %, mean ± std over seeds. "
        "ASR should be read against the false-target rate (a model predicting the target often has a high ASR "
        "without a backdoor) and against the oracle's ASR (excess ASR = ASR − oracle ASR on the same attack: what "
        "the backdoor adds over a model trained on unpoisoned data). Time / lora: train time over undefended LoRA's "
        "in the same run; a defense's time includes the undefended training it needs, its own work and retraining.",
        *([data] if data else []),
        "",
        "| attack | method | seeds | CACC | ASR | excess ASR | false-target rate | train time (s) | time / lora | "
        "defense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seeds = ",".join(str(s) for s in row["seeds"]) or "–"
        if row["errors"]:
            seeds += f" ({len(row['errors'])} failed)"
        if row["na_reason"]:
            lines.append(f"| {row['attack']} | {row['method']} | n/a | n/a: {row['na_reason']} | | | | | | |")
            continue
        seconds = "–" if row["train_time_s"] is None else f"{row['train_time_s']:.1f}"
        ratio = "–" if row["time_ratio_to_lora"] is None else f"{row['time_ratio_to_lora']:.2f}"
        excess = "–" if row["excess_asr"] is None else f"{100 * row['excess_asr']:+.1f}"
        lines.append(
            f"| {row['attack']} | {row['method']} | {seeds} | {pct(row['cacc'], row['cacc_std'])} | "
            f"{pct(row['asr'], row['asr_std'])} | {excess} | "
            f"{pct(row['false_target_rate'], row['false_target_rate_std'])} | {seconds} | {ratio} | "
            f"{_defense_summary(row['defense'])} |"
        )
    failures = [(row["attack"], row["method"], e) for row in rows for e in row["errors"]]
    if failures:
        lines += ["", "Failed cells:", ""] + [f"- {a} / {m}: {e.splitlines()[0]}" for a, m, e in failures]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, preset: str) -> None:
    """Grouped bar chart of CACC, ASR and false-target rate per attack and method, each bar labelled with its value
    (matplotlib, `plot` extra)."""
    plt = _figure_pyplot("The bar chart")
    attacks = list(dict.fromkeys(row["attack"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    panels = (("cacc", "CACC (%)"), ("asr", "ASR (%)"), ("false_target_rate", "false-target rate (%)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(max(5, 2.2 * len(attacks)) * len(panels), 4), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for axis, (metric, label) in zip(axes[0], panels):
        for j, method in enumerate(methods):
            values = []
            for attack in attacks:
                row = next((r for r in rows if r["attack"] == attack and r["method"] == method), None)
                values.append(100 * row[metric] if row and row.get(metric) is not None else 0.0)
            positions = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(attacks))]
            bars = axis.bar(positions, values, width, label=method)
            axis.bar_label(bars, fmt="%.1f", fontsize="x-small", padding=1)
        axis.set_xticks(range(len(attacks)), attacks)
        axis.set_ylabel(label)
        axis.set_ylim(0, 105)
        axis.legend(fontsize="small")
    figure.suptitle("MuScleLoRA benchmark" + (" — QUICK preset (subsampled)" if preset == "quick" else ""))
    save_figure(figure, path)


def curve_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, method, trusted rows): mean and std over seeds of CACC, ASR, false-target rate, time."""
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
        for metric in METRICS:
            row[metric], row[metric + "_std"] = mean_std([c[metric] for c in ok if c.get(metric) is not None])
        row["status"] = "ok" if ok else next((c.get("status") for c in group), "error")
        row["note"] = None if ok else next((c.get("reason") or c.get("error") for c in group), None)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["attack"], r["method"], r["trusted"]))


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
            f"{pct(r['cacc'], r['cacc_std'])} | {pct(r['asr'], r['asr_std'])} | "
            f"{pct(r['false_target_rate'], r['false_target_rate_std'])} | {seconds} |"
        )
    return "\n".join(lines) + "\n"


def plot_curve(rows: list[dict[str, Any]], path: Path, preset: str) -> None:
    """CACC and ASR against trusted rows, one line per method, one row of panels per attack (`plot` extra)."""
    plt = _figure_pyplot("The curve plot")
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
    save_figure(figure, path)
