"""class3d: cost of U replicate classifications in one pass over the data (``model.n_replicates``).

AlphaCryo4D's volume resampling runs hundreds of classifications of overlapping particle
subsets; class3d runs them in the same pass over the data (each batch read, transformed and
CTF-evaluated once, one vectorised E-step over all (particle, replicate, class) triples). This
measures, for each U, the seconds of the seeding iteration and of each later EM iteration
(E-step: the data pass; M-step: U x K reconstructions), and compares them with U separate
runs (U times the U = 1 cost). Each U runs in its own process (peak RSS per U); the data
loader is the training one (``data.num_workers=0``), so the reading and CTF cost is included.

Every particle is in every replicate here (``n_replicates``); AlphaCryo4D's unions hold each
particle in M of them, so its E-step cost is M/U of this.

Example (docs/benchmarks.md, "class3d: U replicates in one pass")::

    nice -n 10 python benchmarks/bench_class3d_replicates.py --replicates 1 10 30 --iterations 3 \\
        --out docs/bench_class3d_replicates.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

DATA = ["data.particles.n_states=4", "data.particles.snr=0.05", "data.particles.n_particles=2000",
        "data.box_size=32", "data.val_fraction=0", "data.batch_size=100", "data.num_workers=0",
        "data.persistent_workers=false"]


def one(u: int, k: int, iterations: int, threads: int, data: list[str]) -> dict:
    """Seconds per iteration (seeding, then E-step and M-step of each later one) for ``U = u``."""
    import torch
    from hydra.utils import instantiate

    from tests.helpers import compose_train

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_train(Path(tmp), ["model=class3d", f"model.n_classes={k}", *data])
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        model = instantiate(cfg.model, **{**dm.info(), "n_iterations": iterations, "n_replicates": u})
        rows = []
        for it in range(iterations):
            start = time.perf_counter()
            model.on_train_epoch_start()
            for i, batch in enumerate(dm.train_dataloader()):
                model.training_step(batch, i)
            mid = time.perf_counter()
            model._maximize()
            rows.append({"iteration": it, "pass_s": mid - start, "mstep_s": time.perf_counter() - mid})
        n = int(dm.info()["n_particles"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    later = rows[1:]
    mean = (lambda key: sum(r[key] for r in later) / len(later)) if later else (lambda key: float("nan"))
    return {"replicates": u, "classes": k, "particles": n, "iterations": rows,
            "seeding_s": rows[0]["pass_s"] + rows[0]["mstep_s"], "estep_s": mean("pass_s"),
            "mstep_s": mean("mstep_s"), "iteration_s": mean("pass_s") + mean("mstep_s"), "peak_rss_mb": round(peak)}


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["replicates"] == 1), None)
    lines = ["| U | seeding (s) | E-step pass (s / iteration) | M-step (s / iteration) | "
             "s / iteration | vs U separate runs | peak RSS (MB) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['iteration_s'] / (r['replicates'] * base['iteration_s']):.2f}" if base else "-"
        lines.append(f"| {r['replicates']} | {r['seeding_s']:.1f} | {r['estep_s']:.1f} | {r['mstep_s']:.1f} | "
                     f"{r['iteration_s']:.1f} | {ratio} | {r['peak_rss_mb']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicates", type=int, nargs="+", default=[1, 10, 30])
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--iterations", type=int, default=3, help="including the seeding iteration (>= 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", nargs="*", default=DATA, help="data overrides (default: 4 states, 2,000 particles)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one U
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    if a.iterations < 2:
        p.error("--iterations must be >= 2 (the first is the seeding iteration)")
    if a.one is not None:
        print(json.dumps(one(a.one, a.classes, a.iterations, a.threads, a.data)))
        return
    rows = []
    for u in a.replicates:
        cmd = [sys.executable, __file__, "--one", str(u), "--classes", str(a.classes), "--iterations",
               str(a.iterations), "--threads", str(a.threads), "--data", *a.data]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"U={u}: {rows[-1]['iteration_s']:.1f} s / iteration", file=sys.stderr)
    from _common import record_run

    record_run({"command": " ".join(sys.argv), "data": a.data, "rows": rows}, a.threads, a.out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
