"""Rank / world / rendezvous plumbing from a launcher's environment (core/tp_env.py, issue 19).

The variables of torchrun, Open MPI, MPICH and srun are read from dicts (each rule and each contradiction), then
real processes are started on this host with the environment each launcher would give them: every one must report
its own rank and the shard of a checkpoint the plan gives that rank, and all must meet at MASTER_ADDR:MASTER_PORT
and receive the same list of everyone, in rank order. No NCCL: the GPU side is not built (docs/tensor-parallel.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core.checkpoint import Checkpoint
from core.config import ModelConfig
from core.errors import LauncherEnvError, RendezvousError
from core.registry import default_registry
from core.synth import make_config, write_checkpoint
from core.tp import TensorParallelPlan
from core.tp_env import DistEnv, check_world, from_env, rendezvous
from core.weights import plan as weights_plan

ROOT = Path(__file__).resolve().parent.parent


# -- reading each launcher's variables --------------------------------------------------------------------------------

def test_torchrun():
    e = from_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                  "MASTER_ADDR": "node0", "MASTER_PORT": "29511"})
    assert e == DistEnv("torchrun", 5, 8, 1, 4, "node0", 29511)


def test_open_mpi_on_one_host_defaults_to_loopback():
    e = from_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
    assert e == DistEnv("openmpi", 2, 4, 2, 4, "127.0.0.1", 29500)


def test_mpich():
    e = from_env({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                  "MASTER_ADDR": "10.0.0.7"})
    assert (e.launcher, e.rank, e.local_rank, e.local_world_size, e.master_addr) == ("mpich", 3, 1, 2, "10.0.0.7")


def test_slurm_node_list_tasks_per_node_and_port():
    e = from_env({"SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
                  "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_NODELIST": "gpu[007-010,012]-ib,cpu1",
                  "SLURM_JOB_ID": "4123456"})
    assert e == DistEnv("slurm", 6, 7, 0, 1, "gpu007-ib", 15000 + 3456)
    plain = from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node3", "MASTER_PORT": "1234"})
    assert (plain.master_addr, plain.master_port) == ("node3", 1234)


def test_inner_launcher_wins():
    # `srun torchrun ...`: SLURM numbers the per-node torchrun agents, torchrun the per-GPU workers
    e = from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2",
                  "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    assert (e.launcher, e.rank, e.world_size) == ("torchrun", 6, 8)


def test_no_launcher_is_one_process():
    assert from_env({}) == DistEnv("none", 0, 1, 0, 1, "127.0.0.1", 29500)


@pytest.mark.parametrize("env,message", [
    ({"RANK": "1"}, r"RANK='1' is set but WORLD_SIZE is not \(torchrun sets both\)"),
    ({"WORLD_SIZE": "2"}, r"WORLD_SIZE='2' is set but RANK is not"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, r"RANK='one' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 must lie in \[0, WORLD_SIZE=2\)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
     r"LOCAL_RANK=2 must be at least 0 and below LOCAL_WORLD_SIZE=2, and at most RANK=1"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "3"}, r"LOCAL_WORLD_SIZE gives 3 ranks on this host"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
     r"openmpi started 4 ranks over several hosts and set no MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP port"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2x",
      "SLURM_JOB_NODELIST": "n1"}, r"SLURM_TASKS_PER_NODE='2x' is not a task count list"),
])
def test_contradictions_are_named(env, message):
    with pytest.raises(LauncherEnvError, match=message):
        from_env(env)


def test_world_must_match_tensor_parallel():
    e = from_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    check_world(e, 2)
    with pytest.raises(LauncherEnvError, match=r"tensor_parallel=4 needs one process per rank, but torchrun started 2"):
        check_world(e, 4)


# -- rendezvous ------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_rank_times_out_naming_it():
    env = DistEnv("torchrun", 0, 3, 0, 3, "127.0.0.1", free_port())
    with pytest.raises(RendezvousError, match=r"ranks \[1, 2\] of 3 never arrived"):
        rendezvous(env, b"0", timeout=0.5)


def test_ranks_disagreeing_on_the_world_fail():
    port = free_port()
    errors = []
    server = threading.Thread(target=lambda: errors.append(_catch(DistEnv("x", 0, 2, 0, 2, "127.0.0.1", port), 5)))
    server.start()
    _catch(DistEnv("x", 1, 3, 1, 3, "127.0.0.1", port), 5)
    server.join()
    assert "rank 1 says the world has 3 ranks, rank 0 says 2" in str(errors[0])


def _catch(env, timeout):
    try:
        return rendezvous(env, b"p", timeout=timeout)
    except RendezvousError as e:
        return e


# -- real processes, as each launcher starts them -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    spec = default_registry()["phi3"].spec  # fused qkv_proj and gate_up_proj; 2 kv heads
    c = make_config(spec, vocab_size=250, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_position_embeddings=64)
    return write_checkpoint(spec, c, tmp_path_factory.mktemp("tp_env") / "phi3")


def launcher_env(launcher: str, rank: int, n: int, port: int) -> dict:
    """What each launcher puts in a worker's environment, for n workers on this host."""
    if launcher == "torchrun":
        return {"RANK": rank, "WORLD_SIZE": n, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": n, "GROUP_RANK": 0,
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TORCHELASTIC_RUN_ID": "none"}
    if launcher == "slurm":  # srun -n n on one node; no MASTER_*: the node list and MASTER_PORT
        return {"SLURM_PROCID": rank, "SLURM_NTASKS": n, "SLURM_LOCALID": rank, "SLURM_NODEID": 0,
                "SLURM_TASKS_PER_NODE": n, "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": 77,
                "MASTER_PORT": port}
    return {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": n, "OMPI_COMM_WORLD_LOCAL_RANK": rank,
            "OMPI_COMM_WORLD_LOCAL_SIZE": n, "MASTER_PORT": port}


@pytest.mark.parametrize("launcher,n", [("torchrun", 2), ("slurm", 4), ("openmpi", 2)])
def test_processes_find_their_rank_shard_and_each_other(ckpt, launcher, n):
    port = free_port()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "OMPI_", "PMI_", "MPI_")) and k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                                     "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, "-m", "core.tp_env", str(ckpt)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, **{k: str(v) for k, v in launcher_env(launcher, r, n, port).items()}})
             for r in range(n)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    mine = [json.loads(out.splitlines()[0]) for out, _ in outs]
    gathered = [json.loads(out.splitlines()[1]) for out, _ in outs]
    assert [m["rank"] for m in mine] == list(range(n))
    assert {(m["launcher"], m["world_size"], m["master_port"]) for m in mine} == {(launcher, n, port)}
    assert all(g == mine for g in gathered)  # everyone received everyone, in rank order
    c = Checkpoint(ckpt)
    spec = default_registry()["phi3"].spec
    wplan = weights_plan(spec, ModelConfig.from_hf(spec, c.config), c)
    tp = TensorParallelPlan.for_weights(spec, wplan, n)
    for r, m in enumerate(mine):
        assert m["shard"]["slices"]["q.weight"] == list(tp.split("q.weight").ranges[r])
        assert m["shard"]["slices"]["k.weight"] == list(tp.split("k.weight").ranges[r])
        assert m["shard"]["bytes"] == tp.rank_bytes(wplan)[r]
    assert len({tuple(m["shard"]["slices"]["o.weight"]) for m in mine}) == n  # each rank its own columns

