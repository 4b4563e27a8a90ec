"""Sums Nsight Compute's raw CSV (one row per kernel launch, gpu__time_duration.sum) by
kernel name: launches, total and mean GPU time, largest first."""
import collections
import csv
import sys

rows = [line for line in open(sys.argv[1], errors="replace") if line.startswith('"')]
reader = csv.DictReader(rows)
totals, counts = collections.defaultdict(float), collections.Counter()
for row in reader:
    name, value = row.get("Kernel Name", ""), row.get("gpu__time_duration.sum", "")
    try:
        duration = float(value.replace(",", ""))
    except ValueError:
        continue
    short = name.split("(")[0][:70]
    totals[short] += duration
    counts[short] += 1
total = sum(totals.values())
print(f"kernels {sum(counts.values())}, GPU time {total / 1e3:.1f} us (units as ncu reports: ns)")
for name, value in sorted(totals.items(), key=lambda kv: -kv[1])[:14]:
    print(f"{value / 1e3:9.1f} us {counts[name]:5d}x  {name}")
