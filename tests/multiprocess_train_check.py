"""Launches a 2-process `jax.distributed` training run over localhost through the CLI, as a
user would on two hosts (run by test_train_loop.py). argv: corpus directory, output directory,
coordinator port.

Each process sees 2 forced CPU devices; the mesh (data 2, fsdp 1, tensor 2) spans both
processes, so every step's reductions cross the process boundary (gloo). Exits non-zero if a
process fails; the losses are in <output directory>/metrics.jsonl (written by process 0).
"""

import os
import subprocess
import sys

corpus, out_dir, port = sys.argv[1], sys.argv[2], sys.argv[3]
args = [
    sys.executable,
    "-m",
    "moa_jax.train",
    "--model",
    "tiny-random",
    "--corpus",
    corpus,
    "--attention",
    "recycled",
    "--prefix-len",
    "24",
    "--tail-len",
    "8",
    "--top-k",
    "6",
    "--steps",
    "2",
    "--batch-size",
    "8",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "1",
    "--no-progress",
    "--log-every",
    "100",
    "--no-async-checkpointing",
    "--out-dir",
    out_dir,
    "--mesh-data",
    "2",
    "--mesh-fsdp",
    "1",
    "--mesh-tensor",
    "2",
]
procs = []
for pid in range(2):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(pid),
    )
    procs.append(
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )
codes = []
for pid, p in enumerate(procs):
    out, _ = p.communicate(timeout=600)
    print(f"--- process {pid} (exit {p.returncode})\n{out}", flush=True)
    codes.append(p.returncode)
sys.exit(max(codes))
