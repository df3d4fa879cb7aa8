"""Run by test_profile_cli.py with 8 forced CPU devices: `python -m moa_jax.profile` on meshes
(8,1,1), (2,2,2), (1,1,8) gives the same influence profiles and the same plan as on one device.

argv: corpus directory, scratch directory, then the meshes (default: those three). Prints one
'OK <mesh>' line per matching mesh.
"""

import sys
from pathlib import Path

import jax
import numpy as np

from moa_jax.plan import Plan
from moa_jax.profile.__main__ import main

assert jax.device_count() == 8, jax.devices()
corpus, scratch = sys.argv[1], Path(sys.argv[2])
# --fast mode, at sizes of the tiny model (explicit flags win over --fast's values). The profiles
# hold every answer-rows sum (copy included) and are compared in full; the plan is searched with
# the 'answer' estimator, whose rule losses on the random tiny model have no near-ties (with the
# copy term added, rules tie to 1e-6 and rounding picks among them).
base = [
    "--fast",
    "--model",
    "tiny-random",
    "--corpus",
    corpus,
    "--lengths",
    "256",
    "384",
    "--estimator",
    "answer",
    "--items",
    "8",
    "--batch-size",
    "8",
    "--validation-length",
    "512",
    "--validation-items",
    "1",
    "--answer-tokens",
    "12",
    "--eps-intervals",
    "1",
    "--max-candidates",
    "2",
    "--calibration-cache",
    str(scratch / "cache"),
    "--no-progress",
]


def run(name, mesh=None):
    out = scratch / name
    assert main(base + ["--out", str(out)] + (["--mesh", mesh] if mesh else [])) == 0
    profiles = {p.name.split("-")[1]: dict(np.load(p)) for p in (out / "profiles").glob("*.npz")}
    return Plan.load(out / "plan.json"), profiles


ref_plan, ref_prof = run("one")
assert set(ref_prof) == {"256", "384"}, ref_prof.keys()
for mesh in sys.argv[3:] or ("8,1,1", "2,2,2", "1,1,8"):
    plan, prof = run("mesh_" + mesh.replace(",", "_"), mesh)
    for n, arrays in ref_prof.items():
        for key, ref in arrays.items():
            np.testing.assert_allclose(
                prof[n][key], ref, rtol=1e-4, atol=1e-6, err_msg=f"{mesh} N={n} {key}"
            )
    np.testing.assert_array_equal(plan.alphas, ref_plan.alphas)
    np.testing.assert_array_equal(plan.betas, ref_plan.betas)
    print("OK", mesh, flush=True)
