"""torchkeep against torch.save/load, safetensors and torch.distributed.checkpoint, in one run.

Usage: python benchmarks/run.py [--sizes 256,1024] [--large] [--repeat 3] [--quick] [--remote-mib 64]
                                [--json benchmarks/results.json] [--dir DIR]

For each state size: save times (raw fsync'd write of the same bytes as the disk's limit), load
times with a cold page cache, peak RSS growth while loading into a model (fresh process each),
hash throughput (torchkeep's xxh3-128, and sha256 for reference). Then a training loop with
checkpoints (slowdown, stall per save with the hooks' block time, loop overhead per save, peak
host memory; DCP async_save against plain, overlapped and bounded async saves), a fine-tuning run
(bytes written per checkpoint), and what a background writer costs the loop (thread, lowered
thread, process; see writer_cost.py), and S3 save and load throughput on a loopback moto server
against s3fs pipe/cat and DCP (benchmarks/_s3.py). ``--sizes ''`` skips the save/load part. Prints a table,
the ratios and PASS/MISS per target of the issues; never fails on a miss. Writes everything as
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Target, drop_caches, evict, machine_info
from _s3 import bench_remote, print_remote, remote_ratios
from _saveload import bench_size, ratios
from distributed_bench import bench_distributed, print_distributed
from train_loop import bench_finetune, bench_train
from writer_cost import bench as bench_writer

HERE = Path(__file__).resolve().parent


def _cold(paths: list[Path]) -> None:
    """Make the next read come from the disk: drop the page cache if allowed, else evict files."""
    if not drop_caches():
        evict(paths)


def _targets(
    sizes: list[dict[str, Any]], train: dict[str, Any], ft: dict[str, Any]
) -> list[Target]:
    ways = train["ways"]
    copy = train["copy_into_preallocated_seconds"]
    tk_stall = ways["CheckpointManager (async)"]["steady_stall"]
    dcp = ways["dcp.async_save"]
    dcp_stall = dcp["steady_stall"]
    ov = ways["CheckpointManager (overlap)"]
    bounded = ways["CheckpointManager (overlap, staging_limit)"]
    ov_stall = ov["steady_stall"]
    spread = "/".join(f"{s * 1e3:.0f}" for s in ov["overhead_spread"])
    dcp_spread = "/".join(f"{s * 1e3:.0f}" for s in dcp["overhead_spread"])
    state, limit = train["state_mib"], train["staging_limit_mib"]
    out = [
        Target(
            "(1a) async stall / copy into preallocated",
            tk_stall / copy,
            1.5,
            detail=f"[{tk_stall * 1e3:.1f} ms vs {copy * 1e3:.1f} ms]",
        ),
        Target(
            "(1b) async stall / DCP async_save stall",
            tk_stall / dcp_stall,
            0.5,
            detail=f"[{tk_stall * 1e3:.1f} ms vs {dcp_stall * 1e3:.1f} ms]",
        ),
        Target(
            "(6a) overlap stall (save + hooks) / copy into preallocated",
            ov_stall / copy,
            0.1,
            detail=f"[{ov_stall * 1e3:.2f} ms, hooks {ov['hook_stall'] * 1e3:.2f} ms, "
            f"vs {copy * 1e3:.1f} ms]",
        ),
        Target(
            "(6b) overlap stall / DCP async_save stall",
            ov_stall / dcp_stall,
            0.2,
            detail=f"[{ov_stall * 1e3:.2f} ms vs {dcp_stall * 1e3:.1f} ms]",
        ),
        Target(
            "(6c) overlap loop overhead per save / DCP async_save's",
            max(ov["overhead_per_save"], 0.0) / max(dcp["overhead_per_save"], 1e-9),
            0.5,
            detail=f"[{ov['overhead_per_save'] * 1e3:.0f} ms (min/max {spread}) vs "
            f"{dcp['overhead_per_save'] * 1e3:.0f} ms (min/max {dcp_spread})]",
        ),
        Target(
            "(6d) overlap peak host memory above the loop / state",
            max(ov["peak_mib_above_loop"], 0.0) / state,  # RSS noise can dip below the loop
            1.1,
            detail=f"[{ov['peak_mib_above_loop']:.0f} MiB vs {state:.0f} MiB]",
        ),
        Target(
            "(6e) staging_limit peak host memory / limit",
            max(bounded["peak_mib_above_loop"], 0.0) / limit,  # as (6d)
            1.0,
            detail=f"[{bounded['peak_mib_above_loop']:.0f} MiB vs {limit:.0f} MiB, "
            f"stall {bounded['steady_stall'] * 1e3:.1f} ms]",
        ),
    ]
    for res in sizes:
        raw = res["save_seconds"]["raw os.write + fsync"]
        for name in ("torchkeep.save", "CheckpointManager sync"):
            s = res["save_seconds"][name]
            out.append(
                Target(
                    f"(2) {res['mib']} MiB {name} throughput / raw fsync'd write",
                    raw / s,
                    0.9,
                    atleast=True,
                    detail=f"[{res['bytes'] / s / 1e9:.2f} vs {res['bytes'] / raw / 1e9:.2f} GB/s]",
                )
            )
    out.append(
        Target(
            "(3) fine-tune bytes written per checkpoint / trainable bytes",
            ft["ratio"],
            1.1,
            detail=f"[{ft['pack_bytes_per_save']} vs {ft['trainable_bytes']}]",
        )
    )
    for res in sizes:
        grow = res["rss_growth_mib"]["torchkeep.load_into"]
        out.append(
            Target(
                f"(4) {res['mib']} MiB load_into peak RSS growth / state size",
                max(grow, 4 / 1024) / res["mib"],
                0.25,
                detail=f"[{grow:.1f} MiB]",
            )
        )
    for res in sizes:
        write = res["write_bytes_per_s"]
        for name, speed in res["hash_bytes_per_s"].items():
            if "torchkeep" not in name:
                continue  # sha256 is printed for reference; torchkeep hashes with xxh3-128
            out.append(
                Target(
                    f"(5) {res['mib']} MiB {name} / disk write bandwidth",
                    speed / write,
                    4.0,
                    atleast=True,
                    detail=f"[{speed / 1e9:.2f} vs {write / 1e9:.2f} GB/s]",
                )
            )
    return out


def _print_size(res: dict[str, Any]) -> None:
    gb = res["bytes"] / 1e9
    raw = res["save_seconds"]["raw os.write + fsync"]
    print(f"\n== state {res['mib']} MiB ({res['bytes']} bytes) ==")
    print(f"{'save':42s} {'median s':>9s} {'GB/s':>6s} {'vs raw':>7s} {'stall s':>8s}")
    for name, s in res["save_seconds"].items():
        stall = res["save_stall_seconds"].get(name)
        tail = f" {stall:8.3f}" if stall is not None else ""
        print(f"{name:42s} {s:9.3f} {gb / s:6.2f} {raw / s:6.2f}x{tail}")
    base = res["load_seconds"]["torch.load"]
    print(
        f"{'load (cold cache, every tensor read)':42s} {'median s':>9s} {'GB/s':>6s} {'vs torch':>8s}"
    )
    for name, s in res["load_seconds"].items():
        print(f"{name:42s} {s:9.3f} {gb / s:6.2f} {s / base:7.2f}x")
    print(f"{'peak RSS growth loading into a model':42s} {'MiB':>9s} {'/ state':>8s}")
    for name, grow in res["rss_growth_mib"].items():
        print(f"{name:42s} {grow:9.1f} {grow / res['mib']:8.3f}")
    for name, bps in res["hash_bytes_per_s"].items():
        print(f"{name:42s} {bps / 1e9:9.2f} GB/s {bps / res['write_bytes_per_s']:5.2f}x write bw")


def _print_train(train: dict[str, Any], ft: dict[str, Any]) -> None:
    print(
        f"\n== training loop: {train['params_mib']:.0f} MiB params, {train['state_mib']:.0f} MiB "
        f"state with Adam, {train['steps']} steps, a save every {train['every']} =="
    )
    copy = train["copy_into_preallocated_seconds"]
    print(f"copy into preallocated buffers (reference stall): {copy * 1e3:.1f} ms")
    print(
        f"{'way':43s} {'total s':>8s} {'slowdown':>9s} {'1st stall':>10s} {'steady stall':>13s}"
        f" {'':13s} {'of it hooks':>11s} {'overhead/save':>14s} {'peak MiB':>9s}"
    )
    for how, w in train["ways"].items():
        print(
            f"{how:43s} {w['seconds']:8.2f} {w['slowdown']:8.2f}x {w['first_stall'] * 1e3:8.1f}ms"
            f" {w['steady_stall'] * 1e3:10.1f}ms ({w['steady_stall'] / copy:5.2f}x copy)"
            f" {w['hook_stall'] * 1e3:9.1f}ms {w['overhead_per_save'] * 1e3:12.0f}ms"
            f" {w['peak_mib_above_loop']:9.0f}"
        )
    print(
        f"\n== fine-tuning, {ft['trainable_bytes'] / ft['total_param_bytes']:.0%} of parameters "
        f"trainable ==\npack bytes added per checkpoint: {ft['pack_bytes_per_save']}, trainable "
        f"bytes {ft['trainable_bytes']}, ratio {ft['ratio']:.3f}"
    )


def _print_writer(writer: dict[str, Any]) -> None:
    print(
        f"\n== background writer, {writer['state_mib']:.0f} MiB written again and again: the "
        "loop's rate against no writer =="
    )
    for how, rates in writer["loop_rate_vs_no_writer"].items():
        cells = "  ".join(f"{name} {rate:.2f}" for name, rate in rates.items())
        print(f"{how:32s} {cells}")
    cells = "  ".join(f"{name} {rate:.2f}" for name, rate in writer["gil"].items())
    print(f"a Python thread's rate beside each stage: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="256,1024", help="state sizes in MiB, comma separated")
    parser.add_argument("--large", action="store_true", help="add a 4096 MiB state")
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, repeat 1")
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    parser.add_argument("--train-mib", type=int, default=64, help="training model params, MiB")
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--train-every", type=int, default=15)
    parser.add_argument("--remote-mib", type=int, default=64, help="S3 (moto) state size, MiB")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.large:
        sizes.append(4096)
    train_args = (args.train_mib, args.train_steps, args.train_every)
    if args.quick:
        sizes, args.repeat, train_args = [64], 1, (16, 12, 4)
        args.remote_mib = 8

    started = time.time()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="torchkeep-bench-") as tmp:
        root = Path(tmp)
        machine = machine_info(root)
        can_drop = drop_caches()
        cache = (
            "dropped with /proc/sys/vm/drop_caches before each load"
            if can_drop
            else "drop_caches refused; files evicted with posix_fadvise(DONTNEED) before each load"
        )
        print(f"torchkeep benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}")
        print(f"cpu: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM")
        print(
            f"disk free: {machine['disk_free_gib']} GiB at {root}; load average {machine['load_average']}"
        )
        print(
            f"python {machine['python']}, torch {machine['torch']}, safetensors "
            f"{machine['safetensors']}, torchkeep {machine['torchkeep']}"
        )
        print(f"page cache: {cache}; repeat {args.repeat} (median)")
        results = []
        for mib in sizes:
            results.append(bench_size(mib, root, args.repeat, _cold))
            _print_size(results[-1])
        train = bench_train(root, *train_args, args.repeat)
        ft = bench_finetune(root)
        _print_train(train, ft)
        distributed = bench_distributed(root, 4 if args.quick else 64, args.repeat)
        print_distributed(distributed)
        remote = bench_remote(args.remote_mib, args.repeat)
        if remote is not None:
            print_remote(remote)
    writer = bench_writer(train_args[0], 1.0, args.repeat)
    _print_writer(writer)

    targets = _targets(results, train, ft)
    if remote is not None:
        pipe = remote["save_seconds"]["s3fs pipe (raw bytes)"]
        cat = remote["load_seconds"]["s3fs cat (raw bytes)"]
        for label, s, ref in (
            ("save / s3fs pipe", remote["save_seconds"]["torchkeep.save"], pipe),
            ("load / s3fs cat", remote["load_seconds"]["torchkeep.load"], cat),
        ):
            targets.append(
                Target(
                    f"(6) {remote['mib']} MiB S3 torchkeep {label}",
                    ref / s,
                    0.9,
                    atleast=True,
                    detail=f"[{s:.2f} s vs {ref:.2f} s]",
                )
            )
    all_ratios: dict[str, float] = {}
    for res in results:
        all_ratios.update({f"{res['mib']} MiB {k}": v for k, v in ratios(res).items()})
    copy = train["copy_into_preallocated_seconds"]
    for how, w in train["ways"].items():
        all_ratios[f"train slowdown: {how}"] = w["slowdown"]
        if how != "none":
            all_ratios[f"train steady stall / copy: {how}"] = max(w["steady_stall"], 1e-9) / copy
    all_ratios["finetune bytes written / trainable bytes"] = ft["ratio"]
    all_ratios["distributed save / dcp.save"] = distributed["save_vs_dcp"]
    all_ratios["distributed load / dcp.load"] = distributed["load_vs_dcp"]
    all_ratios["sharded save / dcp.save"] = distributed["sharded_save_vs_dcp"]
    all_ratios["sharded load / dcp.load"] = distributed["sharded_load_vs_dcp"]
    if remote is not None:
        all_ratios.update(remote_ratios(remote))
    for t in targets:
        all_ratios[f"target {t.name}"] = t.ratio

    print("\n== targets ==")
    for t in targets:
        print(t.line())
    machine["load_average_end"] = list(os.getloadavg())
    machine["wall_seconds"] = round(time.time() - started, 1)
    print(
        f"\nwall time {machine['wall_seconds']} s; load average at end {machine['load_average_end']}"
    )
    document = {
        "machine": machine,
        "page_cache": {"drop_caches": can_drop, "how": cache},
        "repeat": args.repeat,
        "sizes": results,
        "train_loop": train,
        "finetune": ft,
        "distributed": distributed,
        "writer_cost": writer,
        "remote": remote,
        "targets": [t.to_dict() for t in targets],
        "ratios": all_ratios,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
