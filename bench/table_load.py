"""Time and peak memory of loading a big site's table, CSV and Parquet, through
`fedge.train.data.load_site_data` (what the agent's load_data calls), each against an
anchor measured in the same run: pyarrow reading the same file whole and casting the
same 40 columns to float32 (a columnar C++ reader: the floor a Python loader can aim at).

The table: 1,000,000 rows x 42 columns (40 features, every 4th 0/1 and the others
3-decimal floats, plus event and time: a survival task), val_fraction 0.2, standardise
"continuous". The loader once held every cell of the file as a Python string: 3.8 GB
peak for the CSV and 4.9 GB for the Parquet file, against 160 MB of arrays.

Each load runs in a fresh process; its figure is the growth of the process's peak
resident size over the peak after its imports (MiB, although the key says mb).

    python bench/table_load.py [rows]

Ends with: RESULT csv_1m_s=... csv_1m_peak_mb=... csv_vs_arrow=... parquet_1m_s=...
parquet_1m_peak_mb=... parquet_vs_arrow=...  (the _vs_arrow figures: peak memory, fedge
over pyarrow's)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

FEATURES = [f"f{j}" for j in range(40)]

MAKE = textwrap.dedent("""
    import sys
    import numpy as np, pyarrow as pa, pyarrow.csv as pc, pyarrow.parquet as pq
    n, out = int(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    cols = {}
    for j in range(40):
        cols[f"f{j}"] = (rng.integers(0, 2, n) if j % 4 == 0
                         else np.round(rng.normal(50, 15, n), 3))
    cols["event"] = (rng.random(n) < 0.3).astype(np.int64)
    cols["time"] = rng.integers(1, 4000, n)
    table = pa.table(cols)
    pc.write_csv(table, out + ".csv")
    pq.write_table(table, out + ".parquet")
""")

FEDGE = textwrap.dedent("""
    import json, resource, sys, time
    import pyarrow.parquet  # imported once by any agent that reads Parquet; not load memory
    from fedge.train.data import DatasetSpec, load_site_data
    spec = DatasetSpec.from_config({
        "name": "big", "kind": "tabular", "path": sys.argv[1], "task": "survival",
        "features": [f"f{j}" for j in range(40)], "event": "event", "time": "time",
        "val_fraction": 0.2, "standardise": "continuous"})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    data = load_site_data(spec)
    seconds = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    arrays = sum(s.x.nbytes + s.y.nbytes for s in (data.train, data.val, data.test)
                 if s is not None) / 2**20
    print(json.dumps({"s": seconds, "peak_mb": peak, "arrays_mb": arrays}))
""")

ARROW = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np, pyarrow.csv as pc, pyarrow.parquet as pq
    path = sys.argv[1]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    table = pq.read_table(path) if path.endswith(".parquet") else pc.read_csv(path)
    x = np.stack([table.column(f"f{j}").to_numpy().astype(np.float32)
                  for j in range(40)], axis=1)
    seconds = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps({"s": seconds, "peak_mb": peak}))
""")


def _run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], check=True,
                         capture_output=True, text=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory(prefix="fedge-table-load-") as tmp:
        base = str(Path(tmp) / "site")
        subprocess.run([sys.executable, "-c", MAKE, str(rows), base], check=True,
                       timeout=600)
        figures = {}
        for fmt in ("csv", "parquet"):
            path = f"{base}.{fmt}"
            size = Path(path).stat().st_size / 2**20
            fedge, arrow = _run(FEDGE, path), _run(ARROW, path)
            figures[fmt] = fedge, arrow
            print(f"{fmt:8s} {rows:,} rows, {size:.0f} MiB file: fedge {fedge['s']:.1f} s, "
                  f"peak +{fedge['peak_mb']:.0f} MiB ({fedge['arrays_mb']:.0f} MiB of arrays); "
                  f"pyarrow {arrow['s']:.1f} s, peak +{arrow['peak_mb']:.0f} MiB")
    (csv, csv_arrow), (parquet, parquet_arrow) = figures["csv"], figures["parquet"]
    key = "1m" if rows == 1_000_000 else f"{rows}"
    print(f"RESULT csv_{key}_s={csv['s']:.1f} csv_{key}_peak_mb={csv['peak_mb']:.0f} "
          f"csv_vs_arrow={csv['peak_mb'] / csv_arrow['peak_mb']:.2f} "
          f"parquet_{key}_s={parquet['s']:.1f} parquet_{key}_peak_mb={parquet['peak_mb']:.0f} "
          f"parquet_vs_arrow={parquet['peak_mb'] / parquet_arrow['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
