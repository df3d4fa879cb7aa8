"""Sharding on 8 forced CPU devices: sharded forward and generate equal one device.

jax fixes its device count at start-up, so the check runs in a subprocess.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from moa_jax.pallas_kernels import HeadSharding
from moa_jax.parallel import MeshConfig, logical_to_spec, make_mesh

CHECK = Path(__file__).with_name("multidevice_check.py")


# The default run checks one mesh that splits all three axes; every axis alone runs under -m slow
# (each mesh compiles every decoder again: ~45 s apiece on 2 CPU cores).
@pytest.mark.parametrize(
    "meshes",
    [
        ["2,2,2"],
        pytest.param(["8,1,1", "1,1,8", "1,8,1"], marks=pytest.mark.slow),
    ],
)
def test_sharded_forward_and_generate_match_single_device(meshes):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    res = subprocess.run(
        [sys.executable, str(CHECK), *meshes], env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("OK") == len(meshes), res.stdout


def test_mesh_config_errors():
    with pytest.raises(ValueError, match="needs 8 devices"):
        MeshConfig(2, 2, 2).shape(4)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        MeshConfig(-1, -1, 1).shape(4)
    with pytest.raises(ValueError, match="do not divide"):
        MeshConfig(-1, 3, 1).shape(4)
    assert MeshConfig(-1, 2, 1).shape(8) == (4, 2, 1)


def test_undivisible_dims_are_replicated():
    mesh = make_mesh(MeshConfig(1, 1, 1))
    spec = logical_to_spec(("embed", "kv_heads"), (64, 3), mesh)
    assert tuple(spec) == (None, None)


def test_initialize_distributed_needs_the_whole_launch(monkeypatch):
    from moa_jax.parallel import initialize_distributed

    for k in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(k, raising=False)
    assert initialize_distributed() is False  # a plain run joins nothing
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID are not"):
        initialize_distributed()


def test_two_process_generate_matches_single_device():
    """generate on a mesh spanning 2 jax.distributed processes (localhost) equals one device."""
    import json

    sys.path.insert(0, str(Path(__file__).parent))
    from multiprocess_generate_check import cases

    from moa_jax.generate import generate

    check = Path(__file__).with_name("multiprocess_generate_check.py")
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(check), str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    model, prompts, backends = cases()
    for out in outs:
        got = json.loads(out.split("TOKENS", 1)[1])
        for name, att in backends.items():
            kw = {} if att is None else {"attention": att}
            ref = generate(model, prompts, max_new_tokens=6, stop_ids=(), **kw).tokens
            np.testing.assert_array_equal(np.asarray(got[name]), ref, err_msg=name)


@pytest.mark.slow  # ~190 s on 2 cores (SmolLM2 in 3 processes); the default run keeps
#                        the two-process path on the tiny model (the test above)
def test_two_process_generate_cli_prints_the_one_process_text(smollm2, tmp_path):
    """`python -m moa_jax.generate` launched on two processes (JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID) with a MoA plan on a (2, 1, 1) mesh: process 0 prints
    what one process prints, process 1 nothing."""
    argv = [
        sys.executable,
        "-m",
        "moa_jax.generate",
        "--prompt",
        "Name a colour.",
        "--prompt",
        "Name a fruit.",
        "--max-new-tokens",
        "6",
        "--plan",
        "streaming:64:4",
    ]
    base = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"
    )
    one = subprocess.run(argv, env=base, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen(
            argv + ["--mesh", "2,1,1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(
                base,
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e for _, e in outs)

    def text(out):  # without the CPU collectives' own "[Gloo] Rank ..." lines
        return "".join(x for x in out.splitlines(True) if not x.startswith("[Gloo]"))

    assert "### Name a fruit." in one.stdout
    assert text(outs[0][0]) == one.stdout
    assert text(outs[1][0]) == ""


def test_head_sharding_specs():
    """A kernel's `HeadSharding` (where its heads are) gives the shard_map specs: rows over
    data x fsdp when they divide, heads over tensor when it divides the KV heads."""
    mesh = AbstractMesh((2, 1, 2), ("data", "fsdp", "tensor"))
    q = jax.ShapeDtypeStruct((4, 8, 8, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((4, 8, 4, 16), jnp.float32)
    prefill = HeadSharding((2, 2, 2), 2, num_kv_heads=4)
    split = P(("data", "fsdp"), None, "tensor", None)
    assert prefill.shards(mesh) == 2
    assert prefill.in_specs(mesh, (q, k, k)) == (split,) * 3
    assert prefill.out_specs(mesh, 4, q) == split
    assert [s.shape for s in prefill.local_shapes(mesh, (q, k, k))] == [
        (2, 8, 4, 16),
        (2, 8, 2, 16),
        (2, 8, 2, 16),
    ]
    odd = HeadSharding((1, None), (1, 2), num_kv_heads=3)  # 3 KV heads, 3 rows: replicated
    rows = (jax.ShapeDtypeStruct((3, 8, 2), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.int32))
    assert odd.shards(mesh) == 1
    assert odd.in_specs(mesh, rows) == (P(None, None, None), P(None))
