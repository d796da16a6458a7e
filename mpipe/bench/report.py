"""Turning the suites' results into the notes' table, issue 4's targets, JSON and a plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mpipe.bench.runners import AT_CORES, PEER_LABELS, WIDE, WIDE_FACTOR, WIDE_NOFSYNC

logger = logging.getLogger(__name__)

# Slack on "more workers must never make a run slower": a run varies ~10% here.
NOISE_SLACK = 1.05

# Runners that are reference points, not peers mpipe must be ahead of.
NOT_PEERS = frozenset({"mpipe", "floor", "floor-kept", "serial", AT_CORES, WIDE, WIDE_NOFSYNC})


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _label(name: str) -> str:
    return PEER_LABELS.get(name, name)


def speedups(compute: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Per runner: W -> median wall at W=1 / median wall at W."""
    by_runner: dict[str, dict[int, float]] = {}
    for cfg in compute["configs"]:
        for name, s in cfg["summary"].items():
            by_runner.setdefault(name, {})[cfg["workers"]] = s["median_wall_s"]
    out: dict[str, dict[int, float]] = {}
    for name, walls in by_runner.items():
        if 1 in walls:
            out[name] = {w: walls[1] / v for w, v in walls.items()}
    return out


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of issue 4's requirements: measured value, bound, met or not."""
    rows: list[dict[str, Any]] = []
    suites = doc["suites"]
    cores = doc["machine"]["cores"]

    def add(name: str, measured: float | None, bound: str, met: bool | None) -> None:
        rows.append({"target": name, "measured": measured, "bound": bound, "met": met})

    if "compute" in suites:
        walls: dict[int, float] = {}
        to_floor: dict[int, float] = {}
        for cfg in suites["compute"]["configs"]:
            w, summ = cfg["workers"], cfg["summary"]
            walls[w] = summ["mpipe"]["median_wall_s"]
            floor = to_floor[w] = summ["floor"]["median_ratio"]
            add(f"compute W={w}: mpipe / floor({cfg['floor_processes']})", floor, "<= 1.05",
                floor <= 1.05)
            if "floor-kept" in summ:
                add(f"compute W={w}: mpipe / floor({cfg['floor_processes']}), freed memory kept",
                    summ["floor-kept"]["median_ratio"], "reported", None)
            peer_ratios = {n: s["median_ratio"] for n, s in summ.items()
                           if n not in NOT_PEERS}
            if peer_ratios:
                worst = max(peer_ratios, key=lambda n: peer_ratios[n])
                add(f"compute W={w}: mpipe / fastest peer ({worst})",
                    peer_ratios[worst], "< 1 (faster than every peer)",
                    peer_ratios[worst] < 1.0)
        base = walls.get(cores)
        for cfg in suites["compute"]["configs"]:
            w, summ = cfg["workers"], cfg["summary"]
            if w <= cores:
                continue
            # The target: mpipe at W against mpipe at W = cores, pair by pair in
            # the same rounds.  Results from before that runner (run 16 and
            # earlier) fall back to what was the target then: each column's
            # mpipe / floor per pair, divided between the columns, which
            # cancels the 10-25% the machine drifts between columns but adds
            # both columns' noise.  Both, and the plain ratio of medians, are
            # reported.
            at_cores = summ.get(AT_CORES, {}).get("median_ratio")
            name = f"compute W={w} vs W={cores}: more workers than cores"
            bound = f"<= {NOISE_SLACK} (never slower, 5% noise)"
            if at_cores is not None:
                add(f"{name} (mpipe / mpipe at W={cores}, same rounds)", at_cores, bound,
                    at_cores <= NOISE_SLACK)
            if base is None:  # no W = cores column to compare the columns with
                continue
            rel = to_floor[w] / to_floor[cores]
            add(f"{name} (x floor / x floor)", rel, "reported" if at_cores is not None
                else bound, None if at_cores is not None else rel <= NOISE_SLACK)
            add(f"compute W={w} vs W={cores}: mpipe medians, uncorrected", walls[w] / base,
                "reported", None)
    if "io" in suites:
        summ = suites["io"]["summary"]
        add("io: mpipe / IO floor", summ["floor"]["median_ratio"], "<= 1.10",
            summ["floor"]["median_ratio"] <= 1.10)
        if "floor-kept" in summ:
            add("io: mpipe / IO floor, freed memory kept", summ["floor-kept"]["median_ratio"],
                "reported", None)
        peers = {n: s["median_ratio"] for n, s in summ.items() if n not in NOT_PEERS}
        if peers:
            worst = max(peers, key=lambda n: peers[n])
            add(f"io: mpipe / fastest peer ({worst})", peers[worst], "< 1",
                peers[worst] < 1.0)
    if "durable" in suites:
        d = suites["durable"]
        add(f"durable: mpipe / disk time ({d['disk_time_s']:.2f} s measured)",
            d["ratio_to_disk_time"], "<= 1.25", d["ratio_to_disk_time"] <= 1.25)
        add("durable: price of fsync (mpipe fsync / no fsync)",
            d["summary"]["mpipe (no fsync)"]["median_ratio"], "reported", None)
        add("durable: mpipe / durable floor", d["summary"]["floor"]["median_ratio"],
            "reported", None)
        wide = d.get("wide")
        if wide is not None:
            w = f"durable, W={wide['workers']} (cpu_slots {cores})"
            add(f"{w}: mpipe / disk time", wide["ratio_to_disk_time"], "reported", None)
            add(f"{w}: mpipe / mpipe at W={d['workers']}, same rounds",
                wide["over_subject"], "reported", None)
            if "over_subject_nofsync" in wide:  # from run 20 on
                add(f"{w}: mpipe / mpipe at W={d['workers']} without fsync, same rounds",
                    wide["over_subject_nofsync"], "reported", None)
            add(f"{w}: price of fsync (fsync / no fsync at W={wide['workers']}, same rounds)",
                wide["price_of_fsync"], "reported", None)
    if "overhead" in suites:
        o = suites["overhead"]
        empty = o["empty"]["summary"]["mpipe"]["median_wall_s"]
        add("overhead: empty pipeline start + stop (s)", empty, "<= 0.3", empty <= 0.3)
        per = o["per_item"]["median_per_item_ms"]
        add("overhead: per item, 3 trivial stages (ms)", per, "<= 0.2", per <= 0.2)
        ratio = o["memory"]["median_ratio"]
        tasks = o["memory"]["tasks"]
        add(f"overhead: peak tree RSS T={tasks[0]} / T={tasks[1]}", ratio, "<= 1.10",
            ratio is not None and ratio <= 1.10)
        if o["memory"].get("sum_process_peaks_ratio") is not None:
            add(f"overhead: sum of per-process peak RSS T={tasks[0]} / T={tasks[1]}",
                o["memory"]["sum_process_peaks_ratio"], "reported", None)
        if o["memory"].get("median_pss_ratio") is not None:
            add(f"overhead: peak tree PSS T={tasks[0]} / T={tasks[1]} (shared pages once)",
                o["memory"]["median_pss_ratio"], "reported", None)
    if "dask" in suites:
        d = suites["dask"]
        for name, what in (("dask-localcluster", "a LocalCluster started by each run"),
                           ("dask-address", "a long-lived cluster (address:)")):
            ratio = d["over_local"][name]["median_ratio"]
            add(f"dask W={d['workers']}: Dask backend / local backend, {what}", ratio,
                "<= 1.15 (issue 6)", ratio <= 1.15)
    return rows


def print_tables(doc: dict[str, Any], console: Console) -> None:
    suites = doc["suites"]
    cores = doc["machine"]["cores"]
    if "compute" in suites:
        _compute_tables(suites["compute"], cores, console)
    for key, title in (("io", "IO-bound"), ("durable", "Durable IO-bound (fsync)")):
        if key in suites:
            s = suites[key]
            _single_table(s, f"{title}: T={s['tasks']}, R=0, W={s['workers']}", console)
    if "durable" in suites:
        d = suites["durable"]
        if "wide" in d:
            console.print(_wide_note(d, cores))
        console.print(f"disk: {d['bytes_written'] / 1e9:.2f} GB written; sequential write "
                      f"{', '.join(map(str, d['disk_write_mb_s']))} MB/s -> disk time "
                      f"{d['disk_time_s']:.2f} s; mpipe / disk time {d['ratio_to_disk_time']:.2f}")
    if "overhead" in suites:
        _overhead_tables(suites["overhead"], console)
    if "tail" in suites:
        _tail_table(suites["tail"], console)
    if "dask" in suites:
        _dask_table(suites["dask"], console)
    _targets_table(doc["targets"], console)


def _compute_runners(c: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The compute suite's runners: those with an "x RUNNER" column (the first
    column's but mpipe and the floor, then mpipe at W = cores if it ran beside
    W > cores: not in results of run 16 and earlier), and every runner of any
    column, in order of first appearance."""
    names = list(dict.fromkeys(n for cfg in c["configs"] for n in cfg["summary"]))
    ratios = [n for n in c["configs"][0]["summary"] if n not in ("mpipe", "floor", AT_CORES)]
    return ratios + [AT_CORES] * (AT_CORES in names), names


def _ratio_header(name: str, cores: int) -> str:
    return f"x mpipe W={cores}" if name == AT_CORES else f"x {name}"


def _compute_tables(c: dict[str, Any], cores: int, console: Console) -> None:
    sp = speedups(c)
    ratios, names = _compute_runners(c)
    floor1 = next((cfg["summary"]["floor"]["median_wall_s"] for cfg in c["configs"]
                   if cfg["workers"] == 1), None)
    t = Table(title=f"Compute-bound: T={c['tasks']}, R={c['repeat']}, mpipe "
              f"(medians of {c['configs'][0]['summary']['mpipe']['n']} interleaved pairs)")
    for col in ("tasks", "workers", "wall s", "speedup vs 1", "CPU %", "eff. vs floor",
                "eff. vs ideal", "x floor", *(_ratio_header(n, cores) for n in ratios),
                "same total"):
        t.add_column(col, justify="right")
    for cfg in c["configs"]:
        w, summ = cfg["workers"], cfg["summary"]
        m = summ["mpipe"]
        ideal = floor1 / min(w, cores) if floor1 else None
        t.add_row(str(c["tasks"]), str(w), _fmt(m["median_wall_s"]),
                  _fmt(sp.get("mpipe", {}).get(w), ".3f"), _fmt(m["median_cpu_pct"], ".0f"),
                  _fmt(1 / summ["floor"]["median_ratio"], ".3f"),
                  _fmt(ideal / m["median_wall_s"] if ideal else None, ".3f"),
                  _fmt(summ["floor"]["median_ratio"], ".3f"),
                  *(_fmt(summ.get(n, {}).get("median_ratio"), ".3f") for n in ratios),
                  "yes" if all(cfg["agree"].values()) else "NO")
    console.print(t)
    console.print("x RUNNER: median over pairs of mpipe wall / RUNNER wall (< 1: mpipe faster); "
                  "eff. vs floor = 1 / x floor; ideal = serial / min(W, cores)")
    t = Table(title="Every runner: median wall s (speedup vs its own W=1) [CPU %]")
    t.add_column("runner")
    for cfg in c["configs"]:
        t.add_column(f"W={cfg['workers']}", justify="right")
    for name in names:
        cells = []
        for cfg in c["configs"]:
            s = cfg["summary"].get(name)
            if s is None:
                cells.append("-")
                continue
            speed = sp.get(name, {}).get(cfg["workers"])
            cells.append(f"{s['median_wall_s']:.2f} ({_fmt(speed)}) [{s['median_cpu_pct']:.0f}]")
        t.add_row(_label(name), *cells)
    console.print(t)


def _wide_note(d: dict[str, Any], cores: int) -> str:
    w = d["wide"]
    return (f"\"{WIDE_FACTOR} workers per core\": W={w['workers']}, io_slots "
            f"{w.get('io_slots', w['workers'])}, cpu_slots {cores}; \"mpipe / runner\" is "
            f"mpipe at W={d['workers']} with fsync over each runner, in the same rounds")


def _single_table(s: dict[str, Any], title: str, console: Console) -> None:
    t = Table(title=f"{title} (medians of {s['summary']['mpipe']['n']} interleaved pairs)")
    for col in ("runner", "wall s", "CPU %", "mpipe / runner", "same total"):
        t.add_column(col, justify="right")
    for name, v in s["summary"].items():
        t.add_row(_label(name), _fmt(v["median_wall_s"]), _fmt(v["median_cpu_pct"], ".0f"),
                  _fmt(v.get("median_ratio"), ".3f"), "yes" if s["agree"].get(name) else "NO")
    console.print(t)


def _overhead_tables(o: dict[str, Any], console: Console) -> None:
    t = Table(title="Start-up + tear-down of an empty pipeline (T=0, W=2)")
    for col in ("runner", "wall s (median)", "runs"):
        t.add_column(col, justify="right")
    for name, v in o["empty"]["summary"].items():
        t.add_row(_label(name), _fmt(v["median_wall_s"], ".3f"), str(v["n"]))
    console.print(t)
    p = o["per_item"]
    console.print(f"per item, {p['stages']} trivial stages x {p['workers_per_stage']} workers, "
                  f"{p['items']} items: {p['median_per_item_ms']:.3f} ms "
                  f"(fsync: {_fmt(p['median_per_item_fsync_ms'], '.3f')} ms); walls: " + ", ".join(
                      f"{n} {v['median_wall_s']:.2f} s" for n, v in p["summary"].items()))
    m = o["memory"]
    console.print("peak RSS of the process tree (R=0, W=2): " + ", ".join(
        f"{k} {v / 2**20:.0f} MiB" for k, v in m["median_peak_rss_bytes"].items())
        + f"; ratio {_fmt(m['median_ratio'], '.3f')}; sum of per-process peaks: " + ", ".join(
        f"{k} {v / 2**20:.0f} MiB" for k, v in m.get("median_sum_process_peaks_bytes", {}).items())
        + _pss_text(m))


def _pss_medians(m: dict[str, Any]) -> dict[str, int]:
    """The memory suite's PSS medians per T, or nothing: absent before run 18,
    or not readable in every run (no partial figures)."""
    pss = m.get("median_peak_pss_bytes") or {}
    return {} if None in pss.values() else pss


def _pss_text(m: dict[str, Any]) -> str:
    pss = _pss_medians(m)
    if not pss:
        return ""
    return ("; peak PSS of the tree: " + ", ".join(f"{k} {v / 2**20:.0f} MiB"
                                                   for k, v in pss.items())
            + f" (ratio {_fmt(m.get('median_pss_ratio'), '.3f')})")


def _tail_table(s: dict[str, Any], console: Console) -> None:
    t = Table(title=f"The notes' puzzle on {s['tasks']} tasks, R={s['repeat']}: median wall s")
    t.add_column("workers", justify="right")
    names = list(s["configs"][0]["summary"])
    for n in names:
        t.add_column(_label(n), justify="right")
    for cfg in s["configs"]:
        t.add_row(str(cfg["workers"]), *(
            f"{cfg['summary'][n]['median_wall_s']:.2f} [{cfg['summary'][n]['median_cpu_pct']:.0f}%]"
            for n in names))
    console.print(t)


def _dask_rows(d: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, s in d["summary"].items():
        over = d["over_local"].get(name)
        rows.append([_label(name), _fmt(s["median_wall_s"]), _fmt(s["median_cpu_pct"], ".0f"),
                     _fmt(over["median_ratio"], ".3f") if over else "-",
                     " ".join(f"{x:.2f}" for x in over["ratios"]) if over else "-"])
    return rows


DASK_HEADER = ["runner", "wall s", "CPU %", "Dask / local", "per pair"]


def _dask_table(d: dict[str, Any], console: Console) -> None:
    t = Table(title=f"Dask backend vs local, T={d['tasks']}, R={d['repeat']}, W={d['workers']}")
    for i, h in enumerate(DASK_HEADER):
        t.add_column(h, justify="right" if i else "left")
    for row in _dask_rows(d):
        t.add_row(*row)
    console.print(t)


def _targets_table(rows: list[dict[str, Any]], console: Console) -> None:
    t = Table(title="Issue 4 targets")
    for col in ("target", "measured", "bound", "met"):
        t.add_column(col, justify="right" if col != "target" else "left")
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        t.add_row(r["target"], _fmt(r["measured"], ".3f"), r["bound"], met)
    console.print(t)


def write_json(doc: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Speedup vs workers, mpipe and peers, with the floor and the cores' ideal."""
    compute = doc["suites"].get("compute")
    if not compute:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cores = doc["machine"]["cores"]
    sp = speedups(compute)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    workers = [cfg["workers"] for cfg in compute["configs"]]
    ax.plot(workers, [min(w, cores) for w in workers], color="0.7", linestyle=":",
            label=f"ideal: min(W, {cores} cores)")
    for name, by_w in sp.items():
        ws = sorted(by_w)
        style: dict[str, Any] = {"marker": "o"}
        if name == "mpipe":
            style.update(linewidth=2.5, color="C3", zorder=5)
        elif name == "floor":
            style.update(linestyle="--", color="k")
        elif name == "floor-kept":
            style.update(linestyle=":", color="0.35")
        ax.plot(ws, [by_w[w] for w in ws], label=_label(name), **style)
    ax.set_xlabel("workers W")
    ax.set_ylabel("speedup vs W=1 (median walls)")
    ax.set_xticks(workers)
    ax.set_title(f"notes workload, T={compute['tasks']}, R={compute['repeat']}, "
                 f"{cores} cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(doc: dict[str, Any]) -> str:
    """The same tables as GitHub markdown, for docs/BENCHMARKS.md."""
    out: list[str] = []
    suites = doc["suites"]
    cores = doc["machine"]["cores"]

    def table(header: list[str], rows: list[list[str]]) -> None:
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
        out.extend("| " + " | ".join(r) + " |" for r in rows)
        out.append("")

    if "compute" in suites:
        c = suites["compute"]
        sp = speedups(c)
        ratios, names = _compute_runners(c)
        floor1 = next((cfg["summary"]["floor"]["median_wall_s"] for cfg in c["configs"]
                       if cfg["workers"] == 1), None)
        out.append(f"Compute-bound, T={c['tasks']}, R={c['repeat']}: mpipe (medians of "
                   f"{c['configs'][0]['summary']['mpipe']['n']} interleaved pairs)\n")
        rows = []
        for cfg in c["configs"]:
            w, summ = cfg["workers"], cfg["summary"]
            m = summ["mpipe"]
            ideal = floor1 / min(w, cores) if floor1 else None
            rows.append([str(c["tasks"]), str(w), _fmt(m["median_wall_s"]),
                         _fmt(sp.get("mpipe", {}).get(w)), _fmt(m["median_cpu_pct"], ".0f"),
                         _fmt(1 / summ["floor"]["median_ratio"]),
                         _fmt(ideal / m["median_wall_s"] if ideal else None),
                         _fmt(summ["floor"]["median_ratio"]),
                         *(_fmt(summ.get(n, {}).get("median_ratio")) for n in ratios)])
        table(["tasks", "workers", "wall s", "speedup vs 1", "CPU %", "eff. vs floor",
               "eff. vs ideal", "x floor", *(_ratio_header(n, cores) for n in ratios)],
              rows)
        out.append("Every runner: median wall s (speedup vs its own W=1) [CPU %]\n")
        rows = []
        for name in names:
            cells = []
            for cfg in c["configs"]:
                s = cfg["summary"].get(name)
                if s is None:
                    cells.append("-")
                    continue
                speed = _fmt(sp.get(name, {}).get(cfg["workers"]))
                cells.append(f"{s['median_wall_s']:.2f} ({speed}) [{s['median_cpu_pct']:.0f}]")
            rows.append([_label(name), *cells])
        table(["runner", *(f"W={cfg['workers']}" for cfg in c["configs"])], rows)
    for key, title in (("io", "IO-bound"), ("durable", "Durable IO-bound (fsync)")):
        if key in suites:
            s = suites[key]
            out.append(f"{title}, T={s['tasks']}, R=0, W={s['workers']} (medians of "
                       f"{s['summary']['mpipe']['n']} interleaved pairs)\n")
            table(["runner", "wall s", "CPU %", "mpipe / runner"],
                  [[_label(n), _fmt(v["median_wall_s"]), _fmt(v["median_cpu_pct"], ".0f"),
                    _fmt(v.get("median_ratio"), ".3f")] for n, v in s["summary"].items()])
            if key == "durable" and "wide" in s:
                out.append(_wide_note(s, doc["machine"]["cores"]) + "\n")
    if "overhead" in suites:
        o = suites["overhead"]
        out.append("Start-up + tear-down of an empty pipeline (T=0, W=2)\n")
        table(["runner", "wall s (median)"],
              [[_label(n), _fmt(v["median_wall_s"], ".3f")]
               for n, v in o["empty"]["summary"].items()])
        p = o["per_item"]
        out.append(f"Per item through {p['stages']} trivial stages x {p['workers_per_stage']} "
                   f"workers, {p['items']} items\n")
        table(["run", "wall s (median)", "CPU %"],
              [[n, _fmt(v["median_wall_s"]), _fmt(v["median_cpu_pct"], ".0f")]
               for n, v in p["summary"].items()])
        out.append(f"per item: {p['median_per_item_ms']:.3f} ms (fsync: "
                   f"{_fmt(p['median_per_item_fsync_ms'], '.3f')} ms)\n")
        m = o["memory"]
        sums = m.get("median_sum_process_peaks_bytes", {})
        pss = _pss_medians(m)
        table(["tasks (R=0, W=2)", "peak RSS of the process tree, MiB",
               "sum of per-process peaks, MiB",
               *(["peak PSS of the process tree, MiB"] if pss else [])],
              [[k, f"{v / 2**20:.0f}", _fmt(sums[k] / 2**20 if k in sums else None, ".0f"),
                *([_fmt(pss[k] / 2**20, ".0f")] if pss else [])]
               for k, v in m["median_peak_rss_bytes"].items()])
        out.append(f"ratio: {_fmt(m['median_ratio'], '.3f')}"
                   + (f" (PSS: {_fmt(m.get('median_pss_ratio'), '.3f')})" if pss else "")
                   + "\n")
    if "tail" in suites:
        s = suites["tail"]
        names = list(s["configs"][0]["summary"])
        out.append(f"Tail: T={s['tasks']}, R={s['repeat']}: median wall s [CPU %]\n")
        table(["workers", *map(_label, names)],
              [[str(cfg["workers"]), *(f"{cfg['summary'][n]['median_wall_s']:.2f} "
                                       f"[{cfg['summary'][n]['median_cpu_pct']:.0f}]"
                                       for n in names)] for cfg in s["configs"]])
    if "dask" in suites:
        d = suites["dask"]
        out.append(f"Dask backend against the local one, T={d['tasks']}, R={d['repeat']}, "
                   f"W={d['workers']} (medians of {d['summary']['local']['n']} interleaved "
                   "rounds)\n")
        table(DASK_HEADER, _dask_rows(d))
    if doc.get("targets"):
        out.append("Targets (issue 4; the dask rows: issue 6)\n")
        table(["target", "measured", "bound", "met"],
              [[r["target"], _fmt(r["measured"], ".3f"), r["bound"],
                "-" if r["met"] is None else ("yes" if r["met"] else "**no**")]
               for r in doc["targets"]])
    return "\n".join(out)
