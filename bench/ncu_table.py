"""Per-kernel time table of one ncu run (`ncu --metrics gpu__time_duration.sum --csv`), grouped by kernel.

Usage: python3 bench/ncu_table.py PROFILE.csv[.gz] [TITLE]  → Markdown on stdout.
Kernel names are shortened (template arguments and parameter lists dropped) and grouped; each row has the
summed time, its share of the total and the launch count.
"""
import csv
import gzip
import io
import re
import sys
from collections import defaultdict


def short(name):
    name = re.sub(r"\(.*$", "", name)  # parameter list
    while "<" in name:
        new = re.sub(r"<[^<>]*>", "", name)
        if new == name:
            break
        name = new
    name = name.replace("void ", "").strip()
    return name


def main():
    path = sys.argv[1]
    title = sys.argv[2] if len(sys.argv) > 2 else path
    raw = gzip.open(path, "rt").read() if path.endswith(".gz") else open(path).read()
    lines = [l for l in raw.splitlines() if l.startswith('"')]
    rows = csv.DictReader(io.StringIO("\n".join(lines)))
    total, groups = 0.0, defaultdict(lambda: [0.0, 0])
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r["Metric Unit"]
        ms = v / 1e6 if unit == "ns" else v / 1e3 if unit in ("us", "usecond") else v if unit == "ms" else v / 1e6
        g = groups[short(r["Kernel Name"])]
        g[0] += ms
        g[1] += 1
        total += ms
    launches = sum(g[1] for g in groups.values())
    print(f"### {title}\n")
    print(f"{launches} kernels, {total:.1f} ms of kernel time (serialised by ncu)\n")
    print("| kernel | ms | share | launches |")
    print("|---|---|---|---|")
    for name, (ms, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        if ms / total < 0.002 and n < 20:
            continue
        print(f"| `{name[:90]}` | {ms:.2f} | {100 * ms / total:.1f} % | {n} |")
    print()


if __name__ == "__main__":
    main()
