"""Run by test_train_loop.py with 8 forced CPU devices: sharded training equals one device.

argv: corpus directory, scratch directory, then meshes as DATA,FSDP,TENSOR (default: 8,1,1
2,2,2 1,1,8). Prints one 'OK <mesh>' line per mesh whose losses and final parameters match the
single-device run, after checking that params and AdamW moments are really sharded; also checks
the clear error for a batch that does not divide the mesh.
"""

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np

from moa_jax.train.checkpoint import Checkpointer
from moa_jax.train.config import TrainConfig
from moa_jax.train.loop import train
from moa_jax.train.optimizer import make_optimizer

assert jax.device_count() == 8, jax.devices()
corpus, scratch = sys.argv[1], Path(sys.argv[2])
base = TrainConfig(
    model="tiny-random",
    corpus=corpus,
    attention="recycled",
    prefix_len=24,
    tail_len=8,
    top_k=6,
    steps=2,
    batch_size=8,
    lr=3e-3,
    warmup_steps=1,
    progress=False,
    log_every=100,
    async_checkpointing=False,
)


def final_state(run_dir):
    from flax import nnx

    from moa_jax.models.registry import load_model

    _, params = nnx.split(load_model("tiny-random")[0])
    target = {
        "params": params,
        "opt_state": make_optimizer(base).init(params),
        "rng": jax.random.PRNGKey(0),
    }
    return Checkpointer(run_dir).restore(target)[0]


ref = train(
    dataclasses.replace(base, out_dir=str(scratch / "one"), mesh_data=1), devices=jax.devices()[:1]
)
ref_state = final_state(scratch / "one" / "checkpoints")

meshes = [tuple(map(int, a.split(","))) for a in sys.argv[3:]]
for data, fsdp, tensor in meshes or ((8, 1, 1), (2, 2, 2), (1, 1, 8)):
    name = f"mesh_{data}_{fsdp}_{tensor}"
    cfg = dataclasses.replace(
        base, out_dir=str(scratch / name), mesh_data=data, mesh_fsdp=fsdp, mesh_tensor=tensor
    )
    res = train(cfg)
    np.testing.assert_allclose(list(res.losses.values()), list(ref.losses.values()), rtol=2e-5)
    state = final_state(scratch / name / "checkpoints")
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    print("OK", name, res.losses, flush=True)

# Shardings of params and optimizer moments inside the step (checked on a live run's state).
from flax import nnx

from moa_jax.models.registry import load_model
from moa_jax.parallel import MeshConfig, make_mesh, param_shardings
from moa_jax.train.step import opt_state_shardings

mesh = make_mesh(MeshConfig(2, 2, 2))
_, params = nnx.split(load_model("tiny-random")[0])
p_sh = param_shardings(params, mesh)
opt = make_optimizer(base)
o_sh = opt_state_shardings(jax.eval_shape(opt.init, params), params, p_sh, mesh)
opt_state = jax.jit(opt.init, out_shardings=o_sh)(jax.device_put(params, p_sh))
mu = opt_state[1][0].mu["layers"][0]["mlp"]["up_proj"]["kernel"][...]
assert mu.sharding.shard_shape(mu.shape) == (mu.shape[0] // 2, mu.shape[1] // 2), mu.sharding

try:
    train(dataclasses.replace(base, out_dir=str(scratch / "bad"), batch_size=4))
except ValueError as e:
    assert "does not divide over the mesh" in str(e), e
else:
    raise AssertionError("a batch of 4 on 8 data-parallel devices was accepted")
print("OK errors", flush=True)
