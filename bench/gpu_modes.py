"""The speed-mode table from bench/gpu_pipeline.py JSON files (one per `--speed` mode), against the
targets of issue 12 (H200, M = 10, 832x480x81).

    python bench/gpu_modes.py $OUT/gpu_mode_*.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# mode -> (what is measured against the target, the target)
TARGETS = {
    "fast": ("seconds per shot", "<= 30 s per shot (a 12-shot story in under 7 min)"),
    "compiled": ("speed-up vs exact", ">= 1.15x"),
    "lowvram": ("peak GiB", "< 24 GiB"),
}


def rows(paths: list[Path]) -> dict:
    out = {}
    for p in paths:
        r = json.loads(p.read_text())
        name = r.get("speed", "exact") + ("+lora" if r.get("speed_lora") else "")
        out[name] = dict(
            steps=r.get("production_steps"), shot_s=r.get("shot_s"), peak_gib=r.get("peak_gib"),
            forward_s=r.get("forward_s"), device=r.get("device"), model=r.get("model"), error=r.get("error"),
        )
    return out


def verdict(name: str, r: dict, table: dict) -> str:
    if r["error"]:
        return f"failed: {r['error'][:80]}"
    base = name.split("+")[0]
    if base == "fast" and r["shot_s"] is not None:
        return f"{'met' if r['shot_s'] <= 30 else 'missed'} (<= 30 s)"
    if base == "compiled" and "exact" in table and table["exact"]["shot_s"] and r["shot_s"]:
        x = table["exact"]["shot_s"] / r["shot_s"]
        return f"{x:.2f}x vs exact: {'met' if x >= 1.15 else 'missed'} (>= 1.15x)"
    if base == "lowvram" and r["peak_gib"] is not None:
        return f"{'met' if r['peak_gib'] < 24 else 'missed'} (< 24 GiB)"
    return "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path)
    args = ap.parse_args(argv)
    table = rows(args.json)
    first = next(iter(table.values()))
    print(f"{first['device']}, model {first['model']}, random weights\n")
    print("| mode | steps | seconds per shot | one forward (s) | peak GiB | target |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, r in table.items():
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        print(f"| {name} | {f(r['steps'], 'd')} | {f(r['shot_s'], '.1f')} | {f(r['forward_s'], '.2f')} | "
              f"{f(r['peak_gib'], '.1f')} | {verdict(name, r, table)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
