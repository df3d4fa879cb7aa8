"""One of two `jax.distributed` processes over localhost (run by test_parallel.py): greedy
`generate`, dense and with a heterogeneous MoA plan, on a (2, 1, 2) mesh spanning both processes
(2 forced CPU devices each). argv: process id, coordinator port. Prints 'TOKENS <json>'.
"""

import json
import sys

import jax
import numpy as np

from moa_jax.config import ModelConfig
from moa_jax.models.moa_attention import MoAAttention
from moa_jax.models.registry import init_random
from moa_jax.plan import Plan

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=8,
    num_kv_heads=4,
    head_dim=16,
)


def cases():
    """(model, prompts, attention backends) shared with the single-device reference."""
    rng = np.random.RandomState(0)
    prompts = [rng.randint(4, 128, n).tolist() for n in (5, 17, 9, 30)]
    windows = rng.choice([1, 3, 8, 20], (CFG.num_layers, CFG.num_heads)).tolist()
    plan = Plan.from_windows(windows, rng.randint(0, 3, (CFG.num_layers, CFG.num_heads)).tolist())
    return init_random(CFG, seed=0), prompts, {"dense": None, "moa": MoAAttention(plan)}


if __name__ == "__main__":
    jax.distributed.initialize(
        f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1])
    )
    assert jax.device_count() == 4 and jax.local_device_count() == 2

    from moa_jax.generate import generate
    from moa_jax.parallel import MeshConfig, make_mesh

    model, prompts, backends = cases()
    mesh = make_mesh(MeshConfig(2, 1, 2))
    out = {}
    for name, att in backends.items():
        kw = {} if att is None else {"attention": att}
        out[name] = generate(
            model, prompts, max_new_tokens=6, stop_ids=(), mesh=mesh, **kw
        ).tokens.tolist()
    print("TOKENS", json.dumps(out), flush=True)
