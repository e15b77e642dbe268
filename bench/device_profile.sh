#!/usr/bin/env bash
# GPU machine: where a batch-1 decode step of the synthetic GGUF model spends its time. Runs
# bench_model under Nsight Compute over one eager decode step (--profile-step: cudaProfilerStart
# / Stop around it) and prints each kernel's duration, DRAM and SM throughput, in launch order,
# plus the total. Binaries built here and carried in .devbuild/ (bench/device_check.sh says how).
# Usage: bash bench/device_profile.sh [MODEL (default /tmp/synth-glm.gguf)] [gguf|fp8]
set -u
export LD_LIBRARY_PATH=$PWD/.devbuild/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/bigmoe-out}
mkdir -p "$OUT"
M=${1:-/tmp/synth-glm.gguf}
F=${2:-gguf}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout ${PROFILE_TIMEOUT:-400} "$NCU" --clock-control none --profile-from-start off \
  --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum \
  --csv --log-file "$OUT/ncu-$F.csv" \
  .devbuild/bin/bench_model "$M" --synth "$F" --prefill 16 --batch 1 --steps 4 --profile-step > "$OUT/ncu-$F-bench.txt" 2>&1
echo "ncu rc=$?"
python3 - "$OUT/ncu-$F.csv" <<'PY'
import csv, sys, collections
rows = list(csv.reader(l for l in open(sys.argv[1]) if l.startswith('"')))
hdr, rows = rows[0], rows[1:]
ix = {h: i for i, h in enumerate(hdr)}
k = collections.OrderedDict()
for r in rows:
    key = (int(r[ix["ID"]]), r[ix["Kernel Name"]][:60])
    k.setdefault(key, {})[r[ix["Metric Name"]]] = (r[ix["Metric Value"]], r[ix["Metric Unit"]])
tot = 0.0
byname = collections.defaultdict(lambda: [0, 0.0, 0.0])
for (i, n), m in k.items():
    v, u = m.get("gpu__time_duration.sum", ("0", "ns"))
    us = float(v.replace(",", "")) / (1000.0 if u == "nsecond" or u == "ns" else 1.0 if u in ("usecond", "us") else 1e-3)
    tot += us
    mb = float(m.get("dram__bytes_read.sum", ("0", ""))[0].replace(",", "")) * {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1, "Gbyte": 1e3}.get(m.get("dram__bytes_read.sum", ("0", "byte"))[1], 1e-6)
    print(f"{i:4d} {us:8.1f} us  dram {m.get('dram__throughput.avg.pct_of_peak_sustained_elapsed',('?',''))[0]:>6}%  sm {m.get('sm__throughput.avg.pct_of_peak_sustained_elapsed',('?',''))[0]:>6}%  {mb:8.2f} MB  {n}")
    b = byname[n.split("(")[0].split("<")[0]]
    b[0] += 1; b[1] += us; b[2] += mb
print(f"total kernel time {tot:.1f} us over {len(k)} kernels")
for n, (c, us, mb) in sorted(byname.items(), key=lambda x: -x[1][1]):
    print(f"{us:9.1f} us {c:4d}x {mb:9.1f} MB  {n}")
PY
