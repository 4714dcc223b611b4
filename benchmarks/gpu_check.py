"""The first thing to run on a CUDA machine: every model on CUDA in bf16, and its throughput.

For every model config in ``MODELS`` that exists in ``conf/model/``:

1. ``fast_dev_run`` through ``train.py`` on CUDA with ``bf16-mixed`` (a smoke test of the whole
   training path: data module, model, losses, optimiser, checkpointing);
2. one short throughput measurement at box 128 (and the extra boxes listed per model), through
   ``train.py`` with the :class:`hetero.callbacks.throughput.Throughput` callback: images/s over
   the timed training batches and the peak CUDA memory.

Then DynaMight's deformed backprojection (``bench_dynamight_backprojection.py``, box 128 and
256, 8 regions), the analysis on CUDA (one epoch of OPUS-DSD at box 64 with ``predict=true``, then
``analyze.py`` with the decoder, the inference pass and the reconstructions of every cluster
from its particles on the GPU) and the particle loader (``bench_dataloader.py``, 1 GB of box-128
stacks, warm cache).
Results go to ``--out`` (JSON) and, as a Markdown table with the GPU model and date, into
``docs/benchmarks.md`` between the ``gpu-check`` markers (replaced on each run).

Every step has its own time limit, so a hung step costs minutes, not the device budget; the
whole check is sized to finish in under 8 minutes on one H100-class GPU. ``--dry-run`` runs
the same steps on the CPU at tiny sizes (to check the script without a GPU).

Example usage::

    bash benchmarks/gpu_check.sh                   # on the CUDA machine
    python benchmarks/gpu_check.py --dry-run       # on a CPU, to check the script itself
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import machine  # noqa: E402

#: model config -> (boxes to time, extra overrides for the timed runs). Boxes other than the
#: synthetic set's own are made by simulating the set at that box.
MODELS: dict[str, tuple[list[int], list[str]]] = {
    "homogeneous": ([128], []),
    "opusdsd": ([128, 256], []),
    "class3d": ([128], []),
    "dynamight": ([128, 256], []),
    "alphacryo4d": ([128], []),
}
MARK_BEGIN = "<!-- gpu-check:begin -->"
MARK_END = "<!-- gpu-check:end -->"


def _train(overrides: list[str], timeout: float, log: Path) -> tuple[int, float]:
    for o in overrides:  # a fresh run each time: train.py refuses a new run in an old run's folder
        if o.startswith("hydra.run.dir="):
            shutil.rmtree(o.split("=", 1)[1], ignore_errors=True)
    cmd = [sys.executable, str(REPO / "train.py"), *overrides]
    start = time.perf_counter()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        try:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def _data_overrides(box: int, n: int, dry: bool) -> list[str]:
    return [f"data.particles.box_size={box}", f"data.box_size={box}", f"data.particles.n_particles={n}",
            f"data.particles.pixel_size_angstrom={192.0 / box:.4g}", "data.num_workers=" + ("0" if dry else "4")]


def run_checks(args) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    device = ["trainer=cpu"] if args.dry_run else ["trainer=gpu", "trainer.precision=bf16-mixed"]
    common = ["predict=false", "callbacks.progress_bar=null"]
    available = {p.stem for p in (REPO / "conf" / "model").glob("*.yaml")}
    results: dict = {"machine": machine(), "date": dt.date.today().isoformat(), "models": {}}
    try:
        import torch

        if torch.cuda.is_available():
            results["gpu"] = torch.cuda.get_device_name(0)
            results["cuda"] = torch.version.cuda
        results["torch"] = torch.__version__
    except ImportError:
        pass
    small_box = 32 if args.dry_run else 64
    for model, (boxes, extra) in MODELS.items():
        if model not in available:
            results["models"][model] = {"status": "no config in conf/model (not built yet)"}
            continue
        entry: dict = {}
        run = work / f"{model}_fdr"
        code, secs = _train([f"model={model}", *device, *common, "trainer.fast_dev_run=true",
                             f"hydra.run.dir={run}", *_data_overrides(small_box, 400, args.dry_run), *extra],
                            args.step_timeout, work / f"{model}_fdr.log")
        entry["fast_dev_run"] = {"exit": code, "seconds": round(secs, 1)}
        for box in boxes if not args.dry_run else [small_box]:
            out = work / f"{model}_box{box}.json"
            out.unlink(missing_ok=True)
            run = work / f"{model}_box{box}"
            batches = args.batches if not args.dry_run else 6
            batch_size = args.batch_size if not args.dry_run else 8  # full-width networks on a CPU
            code, secs = _train([f"model={model}", *device, *common, "trainer.max_epochs=1",
                                 f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=0",
                                 f"data.batch_size={batch_size}", f"hydra.run.dir={run}",
                                 *_data_overrides(box, args.particles, args.dry_run),
                                 "+callbacks.throughput._target_=hetero.callbacks.throughput.Throughput",
                                 f"+callbacks.throughput.output={out}", *extra],
                                args.step_timeout, work / f"{model}_box{box}.log")
            timing = json.loads(out.read_text()) if out.is_file() else {}
            entry[f"box{box}"] = {"exit": code, "seconds": round(secs, 1), **timing}
        results["models"][model] = entry
        print(model, json.dumps(entry), flush=True)
        _save(results, args)  # partial results survive the outer time limit
    if "opusdsd" in available:
        results["analysis"] = run_analysis_check(args, work, device)
        print("analysis", json.dumps(results["analysis"]), flush=True)
        _save(results, args)
    if "dynamight" in available:
        results["dynamight_backprojection"] = run_backprojection_check(args, work)
        print("dynamight_backprojection", json.dumps(results["dynamight_backprojection"]), flush=True)
        _save(results, args)
    if not args.skip_loader:
        out = work / "loader.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench_dataloader.py"), "--box", "128",
               "--sizes-gb", "0.05" if args.dry_run else "1", "--workers", "4", "--batch", "64",
               "--seconds", "5" if args.dry_run else "20", "--cache", "warm", "--out", str(out),
               "--scratch", str(work / "loader_scratch"), "--delete"]
        try:
            subprocess.run(cmd, cwd=REPO, timeout=args.step_timeout, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            results["loader"] = json.loads(out.read_text())
        except (subprocess.SubprocessError, OSError, json.JSONDecodeError) as err:
            results["loader"] = {"error": f"{type(err).__name__}: {err}"}
    return results


def run_analysis_check(args, work: Path, device: list[str]) -> dict:
    """Train OPUS-DSD one epoch (latents written), then ``analyze.py`` on ``cuda`` (``cpu`` for a
    dry run): decoded maps, the inference pass, per-cluster half-map reconstructions and FSC."""
    run = work / "analysis_run"
    box = 32 if args.dry_run else 64
    code, secs = _train(["model=opusdsd", *device, "callbacks.progress_bar=null", "predict=true",
                         "trainer.max_epochs=1", f"hydra.run.dir={run}", *_data_overrides(box, args.particles, args.dry_run)],
                        args.step_timeout, work / "analysis_train.log")
    entry: dict = {"train": {"exit": code, "seconds": round(secs, 1)}}
    if code != 0:
        return entry
    where = "cpu" if args.dry_run else "cuda"
    cmd = [sys.executable, str(REPO / "analyze.py"), f"run_dir={run}", f"maps.device={where}", "progress=false",
           "n_clusters=8", "umap.enabled=false", "recompute_latents=true", "per_image_fsc_samples=20"]
    start = time.perf_counter()
    with open(work / "analysis_analyze.log", "w") as fh:
        try:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, timeout=args.step_timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    entry["analyze"] = {"exit": code, "seconds": round(time.perf_counter() - start, 1), "device": where}
    metrics = run / "analysis" / "metrics.json"
    if code == 0 and metrics.is_file():
        m = json.loads(metrics.read_text())
        res = [g.get("res_0.143_masked") for g in (m.get("reconstructed") or {}).get("clusters", [])]
        entry["analyze"]["cluster_res_0.143_masked"] = [r for r in res if r]
        entry["analyze"]["reconstructed_auc_vs_truth"] = (m.get("ground_truth") or {}).get(
            "reconstructed_per_state_auc_mean")
    return entry


def run_backprojection_check(args, work: Path) -> list[dict]:
    """DynaMight's deformed backprojection (``bench_dynamight_backprojection.py``) on ``cuda``:
    images/s deformed (8 regions) and rigid, and the time of a half map, at box 128 and 256
    (box 32 on the CPU for a dry run)."""
    runs = [["--box", "32", "--regions", "2", "--gaussians", "500", "--batch", "8", "--device", "cpu"]] \
        if args.dry_run else [["--box", str(b), "--regions", "8", "--batch", "64", "--device", "cuda"]
                              for b in (128, 256)]
    out = []
    for extra in runs:
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench_dynamight_backprojection.py"), *extra]
        try:
            proc = subprocess.run(cmd, cwd=REPO, timeout=args.step_timeout, capture_output=True, text=True)
            if proc.returncode != 0:
                out.append({"args": extra, "exit": proc.returncode, "error": proc.stderr[-300:]})
                continue
            record = json.loads(proc.stdout[proc.stdout.index("{"):])
            out.append({k: record[k] for k in ("box", "regions", "device", "deformed_images_per_second",
                                                "rigid_images_per_second", "half_map_seconds") if k in record}
                       | {"peak_memory_mib": record.get("peak_memory_mib")})
        except (subprocess.SubprocessError, OSError, ValueError) as err:
            out.append({"args": extra, "error": f"{type(err).__name__}: {err}"})
    return out


def _save(results: dict, args) -> None:
    from hetero.utils.files import write_json

    write_json(args.out, results)
    if not args.dry_run:
        update_docs(markdown(results), Path(args.doc))


def markdown(results: dict) -> str:
    lines = [MARK_BEGIN, f"### GPU check ({results.get('gpu', 'no GPU: dry run on CPU')}, "
             f"{results['date']}, torch {results.get('torch', '?')})", "",
             "`bash benchmarks/gpu_check.sh`; train images/s over timed batches after warm-up, "
             "peak CUDA memory; fast_dev_run exit status 0 = the whole training path ran.", "",
             "| model | fast_dev_run | box | train images/s | peak memory (MiB) |", "|---|---|---:|---:|---:|"]
    for model, entry in results["models"].items():
        if "status" in entry:
            lines.append(f"| {model} | {entry['status']} | | | |")
            continue
        fdr = "ok" if entry["fast_dev_run"]["exit"] == 0 else f"FAILED (exit {entry['fast_dev_run']['exit']})"
        for key, val in entry.items():
            if not key.startswith("box"):
                continue
            rate = f"{val['train_images_per_s']:.0f}" if "train_images_per_s" in val else f"failed (exit {val['exit']})"
            mem = f"{val.get('peak_memory_mib', 0):.0f}"
            lines.append(f"| {model} | {fdr} | {key[3:]} | {rate} | {mem} |")
    analysis = results.get("analysis")
    if analysis:
        lines += ["", f"Analysis on the GPU (OPUS-DSD 1 epoch, then analyze.py with maps.device=cuda): "
                      f"`{json.dumps(analysis)[:400]}`"]
    bp = results.get("dynamight_backprojection")
    if bp:
        lines += ["", f"DynaMight deformed backprojection (images/s deformed / rigid, s per half map): "
                      f"`{json.dumps(bp)[:500]}`"]
    loader = results.get("loader") or {}
    if "error" not in loader and loader:
        lines += ["", f"Loader: `{json.dumps(loader)[:300]}`"]
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


def update_docs(text: str, doc: Path) -> None:
    old = doc.read_text() if doc.is_file() else ""
    if MARK_BEGIN in old and MARK_END in old:
        head, rest = old.split(MARK_BEGIN, 1)
        new = head + text + rest.split(MARK_END, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n## GPU check\n\n" + text
    doc.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(REPO / "logs" / "gpu_check"))
    p.add_argument("--out", default=str(REPO / "docs" / "gpu_check.json"))
    p.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--particles", type=int, default=2000, help="synthetic particles per timed box")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=25, help="training batches per timed run")
    p.add_argument("--step-timeout", type=float, default=None,
                   help="seconds per step (default 150; 900 with --dry-run: full-size models on a CPU)")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script itself")
    args = p.parse_args()
    if args.step_timeout is None:
        args.step_timeout = 900.0 if args.dry_run else 150.0
    results = run_checks(args)
    _save(results, args)
    print(markdown(results))


if __name__ == "__main__":
    main()
