"""Process plumbing shared by the distributed tests: spawn N workers that form a gloo group on loopback,
run one worker function of a test module in each, and bring their results back (or fail the test with
every rank's traceback).  Each run is bounded: a hung collective fails the test instead of hanging CI."""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

PG_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, module: str, worker_name: str, port: int, outdir: str, kwargs: dict, world: int) -> None:
    """Body of each spawned process: join the group, run the worker, save its result, leave the group."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # no compile-worker pool: the ranks already share the cores
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        try:
            result = getattr(importlib.import_module(module), worker_name)(rank, **kwargs)
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    if "error" in result:
        sys.exit(1)  # the parent's join() then stops the other ranks at once (no wait for a collective timeout)


def run_workers(module: str, worker_name: str, tmp_path, world: int, timeout_s: float, **kwargs) -> list[dict]:
    """``module.worker_name(rank, **kwargs)`` in ``world`` spawned processes; their results, by rank."""
    import torch.multiprocessing as mp

    sys.path.insert(0, os.path.dirname(__file__))  # the children import the test module by name
    env_before = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # inherited by the spawned children: loopback only
    try:
        ctx = mp.start_processes(_entry, args=(module, worker_name, free_port(), str(tmp_path), kwargs, world),
                                 nprocs=world, join=False, start_method="spawn")
    finally:
        if env_before is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = env_before
    deadline = time.monotonic() + timeout_s
    problem = None
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                problem = f"{worker_name}: {world}-process run did not finish in {timeout_s:.0f}s"
                break
    except Exception as err:  # a rank exited non-zero; join() has already stopped the others
        problem = f"{worker_name}: {type(err).__name__}: {err}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    results, errors = [], []
    for rank in range(world):
        path = tmp_path / f"rank{rank}.pt"
        res = torch.load(path, weights_only=False) if path.exists() else {"error": "wrote no result"}
        if "error" in res:
            errors.append(f"rank {rank} failed:\n{res['error']}")
        results.append(res)
    if errors or problem:
        pytest.fail("\n".join(errors + ([problem] if problem else [])))
    return results
