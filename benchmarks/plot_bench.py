"""PNG plots of measured figures: throughput against concurrency, the per-user / per-GPU Pareto view,
and latency percentiles, every series of one JSON on the same axes.

    python benchmarks/plot_bench.py FILE.json [--out docs/img] [--prefix NAME] [--title TEXT]

FILE is one of
- benchmarks/sweep.py's JSON: trtc's `trtc bench` sweep and its peers (HF transformers) of the same run;
- `trtc bench --concurrency 1,8,32 --output_json` (a list: trtc alone);
- benchmarks/serve_vs_offline.py's JSON: the offline engine and `trtc serve` at each concurrency.
Writes PREFIX_throughput.png, PREFIX_pareto.png and PREFIX_latency.png into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def series_of(data) -> tuple[dict[str, list[dict]], str]:
    """{series name: results in concurrency order} and a default title."""
    if isinstance(data, list):
        return {"trtc": data}, "trtc bench"
    if "trtc" in data:
        title = f"{data['model']} ({data['dtype']}), ISL/OSL {data['isl']}/{data['osl']}, {data['label']}, {data['date']}"
        return {"trtc": data["trtc"], **data["peers"]}, title
    if "offline" in data and "served" in data:
        out = {"trtc offline": [data["offline"][c] for c in sorted(data["offline"], key=int)]}
        for count, levels in data["served"].items():
            out[f"trtc serve, {count} API server{'s' if int(count) > 1 else ''}"] = [
                levels[c] for c in sorted(levels, key=int)]
        return out, "trtc serve against the offline engine"
    raise SystemExit("not a sweep: expected benchmarks/sweep.py's, serve_vs_offline.py's or trtc bench's JSON")


def per_user(r: dict) -> float:
    return r.get("per_user_tokens_per_s") or 1000 / r["tpot_ms"]["mean"]


def save(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(series: dict[str, list[dict]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in series.items():
        ax.plot([r["concurrency"] for r in rs], [r["output_tokens_per_s"] for r in rs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    save(fig, ax, path, title, "requests in flight (concurrency)", "output tokens/s")


def plot_pareto(series: dict[str, list[dict]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in series.items():
        xs, ys = [r["output_tokens_per_s"] for r in rs], [per_user(r) for r in rs]
        ax.plot(xs, ys, marker="o", label=name)
        for r, x, y in zip(rs, xs, ys):
            ax.annotate(str(r["concurrency"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    save(fig, ax, path, title + "\n(points: concurrency; up and right is better)",
         "output tokens/s per GPU (or machine)", "output tokens/s per user")


def plot_latency(series: dict[str, list[dict]], title: str, path: Path) -> None:
    fig, (ttft, itl) = plt.subplots(1, 2, figsize=(10, 4.2))
    for name, rs in series.items():
        if not rs or "ttft_ms" not in rs[0]:
            continue  # a peer measured without per-token times
        cs = [r["concurrency"] for r in rs]
        for ax, key in ((ttft, "ttft_ms"), (itl, "itl_ms" if "itl_ms" in rs[0] else "tpot_ms")):
            line, = ax.plot(cs, [r[key]["mean"] for r in rs], marker="o", label=f"{name}, mean")
            ax.plot(cs, [r[key]["p99"] for r in rs], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{name}, p99")
    for ax, what in ((ttft, "time to first token (ms)"), (itl, "time between tokens (ms): ITL, or TPOT offline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(data, out: Path, prefix: str, title: str | None = None) -> list[Path]:
    series, default_title = series_of(data)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{prefix}_{kind}.png" for kind in ("throughput", "pareto", "latency")]
    for fn, path in zip((plot_throughput, plot_pareto, plot_latency), paths):
        fn(series, title or default_title, path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    ap.add_argument("--prefix", default=None, help="file name prefix [default: the JSON's stem]")
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    for p in plot(json.loads(a.json.read_text()), a.out, a.prefix or a.json.stem, a.title):
        print(p)


if __name__ == "__main__":
    main()
