"""Which rank this process is: rank, world size and rendezvous address, from the launcher that started it.

The variables each launcher sets (the first launcher found wins, innermost first: `srun torchrun ...` gives torchrun's
per-GPU ranks alongside SLURM's per-node task ids, and `mpirun` inside an `sbatch` allocation sees the batch
step's SLURM_PROCID, so the inner launcher is the one that knows this process):

  torchrun (and Ray: the driver hands each worker these)  RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
  Open MPI's mpirun                                        OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
  MPICH / Intel MPI (Hydra)                                PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS
  SLURM's srun                                             SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
                                                           SLURM_TASKS_PER_NODE + SLURM_NODEID, SLURM_*_NODELIST

The rendezvous address is MASTER_ADDR / MASTER_PORT when set (torchrun always sets them); else under SLURM the first
host of the step's node list and port 15000 + the last four digits of SLURM_JOB_ID (PyTorch Lightning's rule: every
rank of a job derives the same port, two jobs on a node differ); else 127.0.0.1 when every rank runs on this host,
and port 29500 (torch's default). rendezvous() then exchanges a payload between all ranks through rank 0 at that
address: what NCCL needs before its communicator exists (rank 0's ncclUniqueId, sent to every rank).
`python -m core.tp_env [CKPT]` prints what this process would be and load, as JSON (see main).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import sys
import time

import attrs

from .errors import LauncherEnvError, RendezvousError

# launcher → (rank, world size, local rank, local world size) variable names; None: that launcher has no such one
LAUNCHERS = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", None),
}
DEFAULT_PORT = 29500  # torch.distributed's


@attrs.frozen
class DistEnv:
    """One process's place in a launch: rank in [0, world_size), its index among this host's ranks (selects the GPU),
    and where rank 0 listens for the rendezvous."""

    launcher: str  # a LAUNCHERS key, or "none" for a single process started by hand
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    master_addr: str
    master_port: int


def _int(env, name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise LauncherEnvError(f"{name}={raw!r} is not an integer") from None


def from_env(environ=None) -> DistEnv:
    """This process's DistEnv from its environment (os.environ by default); LauncherEnvError names a missing or
    contradictory variable. No launcher variable at all is one process: rank 0 of 1."""
    env = os.environ if environ is None else environ
    launcher = next((k for k, names in LAUNCHERS.items() if names[0] in env or names[1] in env), "none")
    if launcher == "none":
        return DistEnv("none", 0, 1, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", _port(env, "none"))
    rank_v, size_v, local_v, lsize_v = LAUNCHERS[launcher]
    rank, world = _int(env, rank_v), _int(env, size_v)
    if rank is None or world is None:
        have, lack = (rank_v, size_v) if world is None else (size_v, rank_v)
        raise LauncherEnvError(f"{have}={env.get(have)!r} is set but {lack} is not ({launcher} sets both)")
    local = _int(env, local_v)
    local_size = _int(env, lsize_v) if lsize_v else _slurm_local_size(env)
    _check(launcher, (rank_v, rank), (size_v, world), (local_v, local),
           (lsize_v or "SLURM_TASKS_PER_NODE", local_size))
    addr = env.get("MASTER_ADDR") or (_first_host(env) if launcher == "slurm" else None)
    if not addr:
        if world > 1 and local_size != world:
            raise LauncherEnvError(f"{launcher} started {world} ranks over several hosts and set no MASTER_ADDR: set "
                                   f"it to rank 0's host name (it is where the ranks meet)")
        addr = "127.0.0.1"
    return DistEnv(launcher, rank, world, 0 if local is None else local, local_size, addr, _port(env, launcher))


def _check(launcher, rank, world, local, local_size) -> None:
    """The rules every launcher's values obey: 0 <= rank < world, 0 <= local rank < local world <= world."""
    (rv, r), (wv, w), (lv, lr), (sv, ls) = rank, world, local, local_size
    if w < 1:
        raise LauncherEnvError(f"{wv}={w} must be at least 1")
    if not 0 <= r < w:
        raise LauncherEnvError(f"{rv}={r} must lie in [0, {wv}={w})")
    if ls is not None and not 1 <= ls <= w:
        raise LauncherEnvError(f"{sv} gives {ls} ranks on this host, which must lie in [1, {wv}={w}]")
    if lr is not None and (lr < 0 or (ls is not None and lr >= ls) or lr > r):
        bound = f" and below {sv}={ls}" if ls is not None else ""
        raise LauncherEnvError(f"{lv}={lr} must be at least 0{bound}, and at most {rv}={r} ({launcher})")


def _port(env, launcher: str) -> int:
    port = _int(env, "MASTER_PORT")
    if port is None:
        job = env.get("SLURM_JOB_ID", "")
        port = 15000 + int(job[-4:]) if launcher == "slurm" and job[-4:].isdigit() else DEFAULT_PORT
    if not 1 <= port <= 65535:
        raise LauncherEnvError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    return port


def _slurm_local_size(env) -> int | None:
    """Tasks on this node from SLURM_TASKS_PER_NODE ("2(x3),1": 2, 2, 2, 1 over the nodes) at SLURM_NODEID."""
    spec, node = env.get("SLURM_TASKS_PER_NODE"), _int(env, "SLURM_NODEID")
    if not spec or node is None:
        return None
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LauncherEnvError(f"SLURM_TASKS_PER_NODE={spec!r} is not a task count list like '2(x3),1'")
        counts += [int(m[1])] * int(m[2] or 1)
    if node >= len(counts):
        raise LauncherEnvError(f"SLURM_NODEID={node} is past the {len(counts)} nodes of SLURM_TASKS_PER_NODE={spec!r}")
    return counts[node]


def _first_host(env) -> str | None:
    """The first host of SLURM's node list ("gpu[007-010,012],cpu1" → "gpu007"): rank 0's, under srun's default
    block distribution."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes:
        return None
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodes)
    prefix, ranges, suffix = m[1], m[2], m[3]
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "") + suffix


def check_world(env: DistEnv, tensor_parallel: int) -> None:
    """LauncherEnvError unless the launch has exactly one process per tensor-parallel rank."""
    if env.world_size != tensor_parallel:
        raise LauncherEnvError(f"tensor_parallel={tensor_parallel} needs one process per rank, but {env.launcher} "
                               f"started {env.world_size} (start {tensor_parallel} processes, or ask for "
                               f"tensor_parallel={env.world_size})")


# -- rendezvous: every rank's payload to every rank, through rank 0 ------------------------------------------------

_HEAD = struct.Struct("!iiI")  # rank, world size, payload length


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def rendezvous(env: DistEnv, payload: bytes, timeout: float = 60.0) -> list[bytes]:
    """Every rank's payload, in rank order, exchanged through rank 0 listening at env.master_addr:master_port.

    RendezvousError, naming the address and the ranks, when a rank does not arrive within `timeout` seconds, two
    ranks claim one number, or the ranks disagree on the world size: a launch gone wrong fails, never hangs.
    """
    if env.world_size == 1:
        return [payload]
    where = f"{env.master_addr}:{env.master_port}"
    deadline = time.monotonic() + timeout
    try:
        return (_serve if env.rank == 0 else _join)(env, payload, deadline, where)
    except OSError as e:  # refused, reset or timed out mid-exchange
        raise RendezvousError(f"rendezvous at {where} failed for rank {env.rank} of {env.world_size}: {e}") from None


def _serve(env: DistEnv, payload: bytes, deadline: float, where: str) -> list[bytes]:
    got: dict[int, tuple[socket.socket, bytes]] = {0: (None, payload)}
    with socket.create_server(("", env.master_port), reuse_port=False) as srv:
        try:
            while len(got) < env.world_size:
                srv.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    missing = sorted(set(range(env.world_size)) - set(got))
                    raise RendezvousError(f"rendezvous at {where}: ranks {missing} of {env.world_size} never "
                                          f"arrived (a worker failed to start, or was started with other values)")
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                rank, world, n = _HEAD.unpack(_recv(conn, _HEAD.size))
                if world != env.world_size or rank in got or not 0 < rank < world:
                    conn.close()
                    why = (f"says the world has {world} ranks, rank 0 says {env.world_size}" if world != env.world_size
                           else "is claimed twice" if rank in got else "is out of range")
                    raise RendezvousError(f"rendezvous at {where}: rank {rank} {why}")
                got[rank] = (conn, _recv(conn, n))
            out = [got[r][1] for r in range(env.world_size)]
            blob = b"".join(struct.pack("!I", len(p)) + p for p in out)
            for r in range(1, env.world_size):
                got[r][0].sendall(blob)
            return out
        finally:
            for conn, _ in got.values():
                if conn is not None:
                    conn.close()


def _join(env: DistEnv, payload: bytes, deadline: float, where: str) -> list[bytes]:
    while True:  # rank 0 may not be listening yet
        try:
            sock = socket.create_connection((env.master_addr, env.master_port),
                                            timeout=max(deadline - time.monotonic(), 0.001))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RendezvousError(f"rendezvous at {where}: rank {env.rank} found no rank 0 listening") from None
            time.sleep(0.05)
    with sock:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(_HEAD.pack(env.rank, env.world_size, len(payload)) + payload)
        out = []
        for _ in range(env.world_size):
            (n,) = struct.unpack("!I", _recv(sock, 4))
            out.append(_recv(sock, n))
        return out


def describe_rank(env: DistEnv, path) -> dict:
    """What this rank would load from checkpoint `path`: its slice of every split role, and its bytes as stored."""
    from .checkpoint import Checkpoint
    from .config import ModelConfig
    from .detect import detect
    from .registry import default_registry
    from .tp import TensorParallelPlan
    from .weights import plan

    ckpt = Checkpoint(path)
    spec = default_registry()[detect(ckpt, default_registry()).name].spec
    wplan = plan(spec, ModelConfig.from_hf(spec, ckpt.config), ckpt)
    tp = TensorParallelPlan.for_weights(spec, wplan, env.world_size)
    roles = sorted({t for src in wplan.sources for t in src.rule.targets})
    slices = {r: list(tp.split(r).ranges[env.rank]) for r in roles if tp.split(r).axis is not None}
    return {"family": spec.name, "slices": slices, "bytes": tp.rank_bytes(wplan)[env.rank]}


def main(argv=None) -> int:
    """`python -m core.tp_env [CKPT]`: this process's launcher, rank, world and rendezvous address (and the shard
    of CKPT it would load) as one JSON line, then, after a rendezvous with every rank, the list of all of them."""
    args = sys.argv[1:] if argv is None else argv
    env = from_env()
    me = attrs.asdict(env)
    if args:
        me["shard"] = describe_rank(env, args[0])
    print(json.dumps(me), flush=True)
    everyone = rendezvous(env, json.dumps(me).encode())
    print(json.dumps([json.loads(p) for p in everyone]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
