"""Peak memory of streaming MPtrj JSON files of growing size: it should stay flat.

``python -m benchmarks.mptrj_streaming [--sizes 25,100,400] [--sample PATH] [--out DIR]`` writes synthetic MPtrj
JSON files of about the given sizes (MB) by repeating the real sample frames under new material and frame ids,
then reads each one in a fresh process with :func:`potentials.datasets.mptrj.read` (discarding the Atoms) and
reports the file size, frames, wall time, throughput and peak resident memory (``ru_maxrss``) of that process,
plus the peak of a process that only imports the reader (the baseline). Results print as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SHARED_DATA = Path(os.environ.get("POTENTIALS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_SAMPLE = SHARED_DATA / "mptrj" / "mptrj_sample_11_frames.json"


def synthetic_frames(sample: Path, n_materials: int) -> Iterator[tuple[str, dict[str, dict]]]:
    """``(mp_id, {frame_id: frame})`` for ``n_materials`` copies of the sample's materials, with unique ids."""
    materials = json.loads(sample.read_text())
    k = 0
    while k < n_materials:
        for mp_id, frames in materials.items():
            if k >= n_materials:
                return
            new_id = f"{mp_id}-copy{k}"
            yield new_id, {f"{fid}-copy{k}": {**frame, "mp_id": new_id} for fid, frame in frames.items()}
            k += 1


def write_synthetic_mptrj(path: Path, sample: Path, n_materials: int) -> int:
    """Write a JSON file in MPtrj's layout material by material (never whole in memory); returns frames written."""
    n_frames = 0
    with open(path, "w") as fh:
        fh.write("{")
        for k, (mp_id, frames) in enumerate(synthetic_frames(sample, n_materials)):
            fh.write(("," if k else "") + json.dumps(mp_id) + ":" + json.dumps(frames))
            n_frames += len(frames)
        fh.write("}")
    return n_frames


_CHILD = """
import resource, sys, time
from potentials.datasets import mptrj
path = sys.argv[1]
t = time.perf_counter(); n = 0
if path != "-":
    for atoms in mptrj.read(path, progress=False):
        n += 1
print(n, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def measure(path: Path | None) -> tuple[int, float, float]:
    """(frames, seconds, peak RSS MiB) of reading ``path`` in a fresh process (None: import only)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path) if path else "-"], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25,100,400", help="approximate file sizes, MB (comma separated)")
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="MPtrj JSON whose frames are repeated")
    parser.add_argument("--out", type=Path, default=None, help="folder for the synthetic files (default: a tmp dir)")
    args = parser.parse_args(argv)
    bytes_per_material = len(args.sample.read_bytes()) / len(json.loads(args.sample.read_text()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        _, _, baseline = measure(None)
        for size_mb in (float(s) for s in args.sizes.split(",")):
            path = folder / f"mptrj_synthetic_{size_mb:g}MB.json"
            n_materials = max(1, int(size_mb * 1e6 / bytes_per_material))
            t = time.perf_counter()
            written = write_synthetic_mptrj(path, args.sample, n_materials)
            print(f"wrote {path.name}: {written} frames in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            frames, seconds, peak = measure(path)
            rows.append((os.path.getsize(path) / 1e6, frames, seconds, peak))
            path.unlink()
    print(f"\nbaseline (import only): peak RSS {baseline:.0f} MiB\n")
    print("| file (MB) | frames | time (s) | MB/s | frames/s | peak RSS (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size, frames, seconds, peak in rows:
        print(f"| {size:.0f} | {frames} | {seconds:.1f} | {size / seconds:.1f} | {frames / seconds:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
