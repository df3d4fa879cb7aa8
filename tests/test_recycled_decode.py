"""Head-major decode kernels (`full_step_decode`, `recycled_decode`): argument checks and the
Triton and Mosaic TPU lowerings. Their outputs and selection scores against masked attention are
checked by the conformance suite (tests/test_conformance_*.py)."""

import jax.numpy as jnp
import pytest

from moa_jax.pallas_kernels import full_step_decode, recycled_decode


def test_bad_shapes_are_errors():
    q = jnp.zeros((1, 4, 16))
    k = jnp.zeros((1, 3, 16, 16))
    with pytest.raises(ValueError, match="do not divide"):
        full_step_decode(q, k, k, jnp.zeros(1, jnp.int32))
    k = jnp.zeros((1, 2, 16, 16))
    with pytest.raises(ValueError, match="pos must be"):
        recycled_decode(q, k, k, jnp.zeros((1, 2, 8), jnp.int32), jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="block_k 12 does not divide"):
        full_step_decode(q, k, k, jnp.zeros(1, jnp.int32), block_k=12, interpret=True)
    with pytest.raises(ValueError, match="scores must be"):
        full_step_decode(q, k, k, jnp.zeros(1, jnp.int32), scores="mean")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_device_platforms(platform):
    """Without a device: the Triton and Mosaic kernels lower (to Triton IR / Mosaic MLIR) at
    Llama-3-8B head shapes, in every mode, so no primitive lacks a lowering rule."""
    import jax

    from moa_jax.pallas_kernels.decode.head_major_tpu import tpu_partials
    from moa_jax.pallas_kernels.decode.head_major_triton import head_major_partials

    b, hkv, group, n, d = 2, 8, 4, 4096, 128
    q = jnp.zeros((b, hkv * group, d), jnp.bfloat16)
    k = jnp.zeros((b, hkv, n, d), jnp.bfloat16)
    qp = jnp.zeros((b,), jnp.int32)
    for pos in (None, jnp.zeros((b, hkv, n), jnp.int32)):
        for logits in (False, True):
            if platform == "cuda":

                def f(q, k, qp, pos):
                    return head_major_partials(
                        q,
                        k,
                        k,
                        qp,
                        pos,
                        bk=64,
                        num_splits=16,
                        scale=0.1,
                        write_logits=logits,
                        interpret=False,
                        num_warps=4,
                    )
            else:

                def f(q, k, qp, pos):
                    return tpu_partials(
                        q, k, k, qp, pos, bk=512, scale=0.1, write_logits=logits, interpret=False
                    )

            try:
                jax.jit(f).trace(q, k, qp, pos).lower(lowering_platforms=(platform,))
            except (ImportError, ModuleNotFoundError) as e:  # jaxlib without that backend
                pytest.skip(f"no {platform} lowering in this jaxlib: {e}")
