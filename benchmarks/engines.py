"""Engine benchmark: one scenario on every engine, against a plain single-process PyTorch floor.

Each measurement runs in a fresh subprocess; wall time is the whole command (start-up
included) and ``run_s`` the training loop alone (summary.json ``wall_s``); peak RSS and peak
PSS are the largest sums of resident and proportional memory over the process tree, sampled
every 0.1 s from /proc (PSS is the one to read: the RSS sum counts shared pages once per process).

    python benchmarks/engines.py                       # quickstart: floor, inprocess, workers
    python benchmarks/engines.py --engines floor,inprocess,workers,flower --rounds 5 --json

The floor does the same local steps with the same data order and aggregation, minus Flower:
no messages, no serialization, no processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOOR = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from fedsim.core import apply_updates, mean_update
from fedsim.federation import Federation
from fedsim.scenario import load_scenario
from fedsim.seeding import torch_generator
from fedsim.train import evaluate, local_train

scn = load_scenario(sys.argv[1], sys.argv[2:])
fed = Federation(scn)                       # data loading is outside run_s, as in the engines
t0 = time.perf_counter()
local, model = scn.federation.local, fed.build_model()
params = fed.initial_arrays()
for rnd in range(1, scn.federation.rounds + 1):
    outs, weights = [], []
    for cid in fed.sample_clients(rnd):
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        x, y = fed.client_data(cid)
        local_train(model, x, y, epochs=local.epochs, steps=local.steps, batch_size=local.batch_size,
                    optimizer=local.optimizer, lr=local.lr, momentum=local.momentum,
                    weight_decay=local.weight_decay, generator=torch_generator(scn.seed, "train", rnd, cid))
        outs.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
        weights.append(len(y))
    params = apply_updates(params, mean_update(params, outs, weights))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    acc = evaluate(model, fed.dataset.x_test, fed.dataset.y_test)["accuracy"]
print(json.dumps({"run_s": time.perf_counter() - t0, "final_accuracy": acc}))
"""


def _tree_memory_kib(root: int) -> tuple[int, int]:
    """Resident (RSS) and proportional (PSS) memory of ``root`` and all its descendants, in KiB.

    The RSS sum counts a page shared by several processes once per process (torch's libraries,
    and every page a forked worker still shares with its zygote), so it overstates what a tree
    of processes uses; PSS charges each process its share of a shared page, so its sum is the
    memory the tree takes.
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(kids)
        frontier += kids
    rss = pss = 0
    for pid in tree:
        for name, field in ((f"/proc/{pid}/status", "VmRSS:"), (f"/proc/{pid}/smaps_rollup", "Pss:")):
            try:
                for line in Path(name).read_text().splitlines():
                    if line.startswith(field):
                        if field == "Pss:":
                            pss += int(line.split()[1])
                        else:
                            rss += int(line.split()[1])
                        break
            except OSError:
                pass
    return rss, pss


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; wall time, peak tree RSS and PSS (MiB), return code and stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            rss, pss = _tree_memory_kib(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": peak[0] / 1024, "peak_pss_mib": peak[1] / 1024,
            "rc": proc.returncode,
            "stdout": out, "stderr": err[-2000:]}


def run_engine(engine: str, scenario: str, overrides: list[str], workdir: Path) -> dict:
    """One measurement of ``engine`` (or ``floor``) on the scenario."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    if engine == "floor":
        m = measure([sys.executable, "-c", FLOOR, scenario, *overrides], env)
        if m["rc"] == 0:
            m.update(json.loads(m["stdout"].strip().splitlines()[-1]))
        return m
    out = workdir / engine
    out.parent.mkdir(parents=True, exist_ok=True)
    m = measure([sys.executable, "-m", "fedsim.cli", "run", scenario, "--out", str(out), "--quiet",
                 "--set", f"engine.kind={engine}", *(a for o in overrides for a in ("--set", o))], env)
    if m["rc"] == 0:
        summary = json.loads((out / "summary.json").read_text())
        m.update(run_s=summary["wall_s"], final_accuracy=summary["final_accuracy"])
    return m


def _median(ms: list[dict]) -> dict:
    """The measurement with the median training time (all of them must have succeeded)."""
    failed = [m for m in ms if m["rc"] != 0]
    if failed:
        return failed[0]
    ordered = sorted(ms, key=lambda m: m.get("run_s", m["wall_s"]))
    out = dict(ordered[len(ordered) // 2])
    out["run_s_all"] = [round(m.get("run_s", 0.0), 3) for m in ms]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default=str(ROOT / "scenarios/quickstart.yaml"))
    p.add_argument("--engines", default="floor,inprocess,workers")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--repeat", type=int, default=1, help="measure each engine N times (interleaved); report medians")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"federation.rounds={args.rounds}"] if args.rounds else [])
    runs: dict[str, list[dict]] = {e: [] for e in args.engines.split(",")}
    with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as tmp:
        for rep in range(args.repeat):                      # interleaved, so drifting load hits all engines
            for engine in runs:
                m = run_engine(engine, args.scenario, overrides, Path(tmp) / str(rep))
                runs[engine].append(m)
                print(f"{engine} #{rep + 1}: rc={m['rc']} wall {m['wall_s']:.1f}s run {m.get('run_s', 0):.2f}s",
                      file=sys.stderr)
    results = {engine: _median(ms) for engine, ms in runs.items()}
    floor = results.get("floor", {}).get("run_s")
    floor_wall = results.get("floor", {}).get("wall_s")
    rows = []
    for engine, m in results.items():
        ratio = m.get("run_s") / floor if floor and m.get("run_s") else None
        rows.append({"engine": engine, "ok": m["rc"] == 0, "wall_s": round(m["wall_s"], 2),
                     "wall_vs_floor": round(m["wall_s"] / floor_wall, 3) if floor_wall else None,
                     "run_s_all": m.get("run_s_all"),
                     "run_s": round(m["run_s"], 2) if m.get("run_s") else None,
                     "peak_rss_mib": round(m["peak_rss_mib"], 1), "peak_pss_mib": round(m["peak_pss_mib"], 1),
                     "run_vs_floor": round(ratio, 3) if ratio else None,
                     "final_accuracy": m.get("final_accuracy"), **({} if m["rc"] == 0 else {"error": m["stderr"]})})
    if args.json:
        print(json.dumps({"scenario": args.scenario, "overrides": overrides, "cpus": os.cpu_count(), "rows": rows},
                         indent=2))
    else:
        print(f"{'engine':<10} {'wall s':>8} {'wall/floor':>10} {'run s':>8} {'run/floor':>9} {'peak RSS MiB':>13} "
              f"{'peak PSS MiB':>13} {'accuracy':>9}")
        for r in rows:
            acc = f"{100 * r['final_accuracy']:.2f}%" if r["final_accuracy"] is not None else "-"
            print(f"{r['engine']:<10} {r['wall_s']:>8} {r['wall_vs_floor'] or '-':>10} {r['run_s'] or '-':>8} "
                  f"{r['run_vs_floor'] or '-':>9} {r['peak_rss_mib']:>13} {r['peak_pss_mib']:>13} {acc:>9}")
        print("targets (issue 10): workers wall/floor <= 1.2 on the quickstart; a 1-round workers run <= 4 s "
              "(--rounds 1); workers peak memory (PSS: shared pages counted once) <= 1024 MiB with 2 workers")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
