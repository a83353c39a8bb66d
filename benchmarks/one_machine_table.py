"""The 5-minute table with every row from one kind of machine: the rows of a results_table.py run on it
(``--table``) completed by the rows measured on the same kind of machine in earlier runs, each from its own
committed results file and marked with it.

    python benchmarks/one_machine_table.py --table benchmarks/results/budget_5m_fp32 \
        --out benchmarks/results/budget_5m_fp32_all

Earlier rows: the methods of ``budget_5m.json`` whose ``machine`` says fp32 (their means of three seeds) or
that were run there on 2026-12-03/04 (``patches``, ``emp_ssl``), and SwAV's preset from
``swav_5m_fp32.json``. A row is "above" random init when both its kNN and linear probe are above the
random-init row's (the mean of its initialisations), and "level" when it is not above the best of them
on both. A method of the table with more seeds in ``seeds_5m_fp32.json`` (runs of the same command with
``train.seed=S``) is shown as the mean of its seeds. A preset changed since its row was measured, and
measured again as it is now on the same kind of machine (``presets_5m_fp32.json``), replaces its row.
MAE needs a ViT: its row (``mae_5m_fp32.json``, vit_tiny) is judged against its own ``random:vit_tiny`` row,
shown just above it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ORDER = ("rotation jigsaw relative_location deepcluster colorization inpainting dcgan bigan simclr moco_v2 byol "
         "simsiam barlow_twins vicreg moco_v3 simclr_v2 swav dino distill mae patches emp_ssl").split()
FP32_EARLIER = {"patches": "2026-12-03/04, fp32 machine (no training: the row does not depend on the machine's speed)",
                "emp_ssl": "2026-12-03, fp32 machine"}


def earlier_rows() -> dict[str, dict]:
    """Rows measured on the fp32 kind of machine before, with where each comes from."""
    budget = json.loads((RESULTS / "budget_5m.json").read_text())["rows"]
    rows = {}
    for name, row in budget.items():
        if "fp32" in row.get("machine", ""):
            rows[name] = dict(row, source=f"budget_5m.json ({row.get('rerun')}; mean of three seeds)")
        elif name in FP32_EARLIER:
            rows[name] = dict(row, source=f"budget_5m.json ({FP32_EARLIER[name]})")
    swav = json.loads((RESULTS / "swav_5m_fp32.json").read_text())
    preset = next(r for r in swav["rows"] if not r["overrides"])
    rows["swav"] = dict(preset, source=f"swav_5m_fp32.json (the preset, {swav['settings']['date']})")
    mae = RESULTS / "mae_5m_fp32.json"
    if mae.exists():  # a ViT: its own random-init row, one initialisation
        got = json.loads(mae.read_text())["rows"]
        rows["random:vit_tiny"] = dict(got["random:vit_tiny"], source="mae_5m_fp32.json (one initialisation)")
        rows["mae"] = dict(got["mae"], source="mae_5m_fp32.json (vit_tiny, against random:vit_tiny)",
                           baseline="random:vit_tiny")
    return rows


def mean_of(seeds: dict[str, dict]) -> dict:
    """kNN and linear means of a row's seeds, and their steps joined by /."""
    vals = list(seeds.values())
    mean = {p: sum(s[p] for s in vals) / len(vals) for p in ("knn", "linear")}
    return dict(mean, seeds=seeds, steps="/".join(str(s["steps"]) for s in vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, help="PREFIX of a results_table.py --results run on the machine")
    ap.add_argument("--out", required=True, help="writes PREFIX.json and PREFIX.md")
    args = ap.parse_args()
    table = json.loads(Path(args.table).with_suffix(".json").read_text())
    rows = {n: dict(r, source=f"{Path(args.table).name}.json") for n, r in table["rows"].items()}
    more = json.loads((RESULTS / "seeds_5m_fp32.json").read_text())["rows"]
    for name in set(rows) & set(more):
        rows[name] = dict(rows[name], **mean_of(more[name]["seeds"]),
                          source=f"{rows[name]['source']} and seeds_5m_fp32.json (mean of {len(more[name]['seeds'])} seeds)")
    for name, row in earlier_rows().items():
        rows.setdefault(name, row)
    now = json.loads((RESULTS / "presets_5m_fp32.json").read_text())["rows"]
    for name, row in now.items():  # the preset as it is now, measured after the table
        n = len(row["seeds"])
        rows[name] = dict(row, **mean_of(row["seeds"]), source=f"presets_5m_fp32.json ({row['date']}: {row['change']}"
                          + (f"; mean of {n} seeds)" if n > 1 else ")"))
    base = rows["random:convnet"]
    names = ["random:convnet"] + [n for m in ORDER if m in rows
                                  for n in ([rows[m]["baseline"]] if "baseline" in rows[m] else []) + [m]]

    def best_of(b: dict) -> dict:  # the best initialisation of a random-init row
        seeds = b.get("seeds") or {"0": b}
        return {p: max(s[p] for s in seeds.values()) for p in ("knn", "linear")}

    lines = ["| method | kNN top-1 (k=200) | linear top-1 | steps | source |", "|---|---|---|---|---|"]
    best = best_of(base)
    above, clear = [], []
    for name in names:
        r = rows[name]
        mark = ""
        if not name.startswith("random:"):
            b = rows[r.get("baseline", "random:convnet")]
            ok = r["knn"] > b["knn"] and r["linear"] > b["linear"]
            above += [name] if ok else []
            clear += [name] if all(r[p] > best_of(b)[p] for p in ("knn", "linear")) else []
            mark = "" if name in clear else " (level: above the mean, not every initialisation)" if ok else \
                " (not above random init)"
        lines.append(f"| {name}{mark} | {r['knn']:.3f} | {r['linear']:.3f} | {r.get('steps', '-')} | {r['source']} |")
    trained = [n for n in names if not n.startswith("random:")]
    own = "".join(f", {n} against {b} ({rows[b]['knn']:.3f} / {rows[b]['linear']:.3f})"
                  for n in trained if (b := rows[n].get("baseline")))
    summary = (f"{len(above)} of {len(trained)} rows above random init ({base['knn']:.3f} / {base['linear']:.3f}{own}) "
               f"on both kNN and linear; not above: {', '.join(n for n in trained if n not in above) or 'none'}; "
               f"{len(clear)} also above every initialisation ({best['knn']:.3f} / {best['linear']:.3f}); "
               f"missing: {', '.join(m for m in ORDER if m not in rows) or 'none'}.")
    md = "\n".join(lines) + "\n\n" + summary + "\n"
    out = Path(args.out)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"settings": table["settings"], "summary": summary,
                                                    "rows": {n: rows[n] for n in names}}, indent=1) + "\n")
    print(md)


if __name__ == "__main__":
    main()
