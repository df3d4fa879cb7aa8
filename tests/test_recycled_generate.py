"""generate() with Recycled Attention and its baselines: the exact limits (K >= length and S = 1
equal dense decoding), no refresh equals a SnapKV-style recomputation oracle, the dynamic
schedule's extremes equal the fixed ones, GQA ratios, and MoA prefill + recycled decode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moa_jax.generate import generate
from moa_jax.generate.__main__ import GenerateConfig, attention_backend, method_choice
from moa_jax.generate.__main__ import main as generate_main
from moa_jax.models.attention import Attention, DenseAttention
from moa_jax.models.causal_lm import forward
from moa_jax.models.eviction_attention import H2OAttention, StreamingAttention
from moa_jax.models.moa_attention import MoAAttention
from moa_jax.models.recycled_attention import RecycleConfig, RecycledAttention
from moa_jax.models.registry import init_random
from moa_jax.pallas_kernels.reference import mha_reference, window_sink_mask
from moa_jax.plan import Plan

from conftest import tiny_config

CACHE_LEN = 128
NEW = 8
REF = dict(kernel_backend="reference", block=16)


def _prompts(seed, lens=(9, 41, 26)):
    rng = np.random.RandomState(seed)
    return [rng.randint(4, 128, n).tolist() for n in lens]


def _run(model, prompts, attention=DenseAttention(), **kw):
    return generate(
        model,
        prompts,
        max_new_tokens=NEW,
        stop_ids=(),
        attention=attention,
        max_cache_len=CACHE_LEN,
        **kw,
    ).rows()


@pytest.fixture(scope="module")
def model():
    return init_random(tiny_config(), seed=7)


@pytest.fixture(scope="module")
def runs(model):
    """Lazily computed generate() rows per named configuration (shared by several tests)."""
    prompts = _prompts(0)
    backends = {
        "dense": DenseAttention(),
        "never": RecycledAttention(RecycleConfig(k=NEW, stride=None), **REF),
        "fixed2": RecycledAttention(RecycleConfig(k=NEW, stride=2), **REF),
        "dyn_hi": RecycledAttention(RecycleConfig(k=NEW, stride=2, dynamic_threshold=1.0), **REF),
        "dyn_lo": RecycledAttention(RecycleConfig(k=NEW, stride=2, dynamic_threshold=-1.0), **REF),
    }
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _run(model, prompts, backends[name])
        return cache[name]

    get.prompts = prompts
    return get


@pytest.mark.parametrize(
    "backend",
    [
        RecycledAttention(RecycleConfig(k=CACHE_LEN, stride=3), **REF),
        RecycledAttention(RecycleConfig(k=5, stride=1), **REF),
        pytest.param(
            RecycledAttention(RecycleConfig(k=CACHE_LEN, stride=2, dynamic_threshold=0.9), **REF),
            marks=pytest.mark.slow,
        ),
        StreamingAttention(CACHE_LEN, **REF),
        H2OAttention(CACHE_LEN, **REF),
    ],
    ids=["k>=len", "s=1", "k>=len-dynamic", "streaming-k>=len", "h2o-k>=len"],
)
def test_exact_limits_equal_dense(model, runs, backend):
    assert _run(model, runs.prompts, backend) == runs("dense")


@pytest.mark.parametrize(
    "kv_heads,backend",
    [
        (1, RecycledAttention(RecycleConfig(k=CACHE_LEN, stride=4), **REF)),
        pytest.param(
            4, RecycledAttention(RecycleConfig(k=6, stride=1), **REF), marks=pytest.mark.slow
        ),
    ],
    ids=["group4-k>=len", "group1-s=1"],
)
def test_gqa_ratios(kv_heads, backend):
    m = init_random(tiny_config(num_kv_heads=kv_heads), seed=8)
    prompts = _prompts(1, (17, 33))
    assert _run(m, prompts, backend) == _run(m, prompts)


def test_dynamic_extremes_equal_fixed_schedules(runs):
    # Threshold 1.0: every check (each QC = 2 steps) refreshes, i.e. the fixed stride 2.
    assert runs("dyn_hi") == runs("fixed2")
    # Threshold -1.0: no check ever refreshes (and K >= new tokens forces none): no refresh.
    assert runs("dyn_lo") == runs("never")
    # The schedules do change the outputs, so the equalities above are not vacuous.
    assert runs("fixed2") != runs("never") and runs("never") != runs("dense")


# ------------------------------------------------------------------------------ SnapKV oracle
@dataclasses.dataclass(frozen=True)
class SnapKVRecompute(Attention):
    """Oracle without a cache: the whole sequence recomputed, one row whose prompt is
    prompt_len tokens. Prompt queries attend causally (or under the plan's windows); a
    generated query at position i attends to the K prompt tokens that the last prompt token's
    pooled, group-max probabilities rank highest, except the (i - prompt_len) lowest of them
    (each generated token replaced one), plus the generated tokens up to itself."""

    prompt_len: int
    k: int
    pool: int = 7
    plan: Plan | None = None

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        b, t, h, d = q.shape
        hkv = k.shape[2]
        g = h // hkv
        n0 = self.prompt_len
        pos = jnp.arange(t)
        if self.plan is None:
            prompt_mask = jnp.broadcast_to(pos[None, :] <= pos[:, None], (b, h, t, t))
        else:
            prompt_mask = window_sink_mask(
                positions,
                pos,
                jnp.asarray(self.plan.layer_windows(CACHE_LEN, layer)),
                jnp.asarray(self.plan.layer_sinks(layer)),
            )
        ql = q[:, n0 - 1].astype(jnp.float32).reshape(b, hkv, g, d)
        lg = jnp.einsum("bkgd,bskd->bkgs", ql, k[:, :n0].astype(jnp.float32)) * d**-0.5
        sc = jnp.max(jax.nn.softmax(lg, axis=-1), axis=2)  # [B, Hkv, n0]
        r = self.pool // 2
        padded = jnp.pad(sc, ((0, 0), (0, 0), (r, r)), constant_values=-jnp.inf)
        pooled = jnp.max(jnp.stack([padded[..., i : i + n0] for i in range(2 * r + 1)]), 0)
        desc = jnp.argsort(-pooled, axis=-1, stable=True)[..., : min(self.k, n0)]
        desc = jnp.pad(desc, ((0, 0), (0, 0), (0, self.k - desc.shape[-1])), constant_values=-1)
        asc = desc[..., ::-1]  # [B, Hkv, K]
        onehot = asc[..., None] == pos  # [B, Hkv, K, S]
        alive = jnp.arange(self.k)[None, :] >= (pos[:, None] - n0)  # [T, K]
        sel = jnp.einsum("tj,bkjs->bkts", alive.astype(jnp.int32), onehot.astype(jnp.int32)) > 0
        gen = (pos[None, :] >= n0) & (pos[None, :] <= pos[:, None])  # [T, S]
        gen_mask = jnp.repeat(sel | gen[None, None], g, axis=1)  # [B, H, T, S]
        mask = jnp.where((pos >= n0)[None, None, :, None], gen_mask, prompt_mask)
        return mha_reference(q, k, v, mask)


def recompute_greedy(model, prompt, n, oracle):
    g, s = nnx.split(model)
    seq = list(prompt)
    pos = jnp.arange(CACHE_LEN)[None]
    for _ in range(n):
        buf = jnp.asarray([seq + [0] * (CACHE_LEN - len(seq))])
        logits, _ = forward(g, s, buf, pos, attention=oracle, logits_at=jnp.asarray([len(seq) - 1]))
        seq.append(int(jnp.argmax(logits[0])))
    return seq[len(prompt) :]


def test_no_refresh_equals_snapkv_recomputation(model, runs):
    rows = runs("never")
    for p, row in zip(runs.prompts[:2], rows[:2]):
        assert row == recompute_greedy(model, p, NEW, SnapKVRecompute(len(p), NEW))


def _sparse_plan(cfg, seed):
    rng = np.random.RandomState(seed)
    windows = rng.choice([3, 8, 21, 10**6], (cfg.num_layers, cfg.num_heads))
    sinks = rng.choice([0, 4], (cfg.num_layers, cfg.num_heads))
    return Plan.from_windows(windows.tolist(), sinks.tolist()).validate(cfg)


def test_moa_prefill_then_recycled_decode_equals_its_oracle(model, runs):
    plan = _sparse_plan(model.config, 0)
    moa = MoAAttention(plan, length=CACHE_LEN, kernel_backend="reference")
    prompts = runs.prompts[1:]
    out = _run(model, prompts, _recycled(moa, RecycleConfig(k=NEW, stride=None)))
    for p, row in zip(prompts, out):
        assert row == recompute_greedy(model, p, NEW, SnapKVRecompute(len(p), NEW, plan=plan))
    assert out != runs("never")[1:]  # the MoA prefill changes the outcome


def test_pallas_kernels_in_generate_equal_the_oracles(model, runs):
    """MoA prefill (block-sparse kernel) + recycled decode with refreshes, all through the
    Pallas kernels in interpret mode, equals the same run through the jnp oracles."""
    plan = _sparse_plan(model.config, 1)
    cfg = RecycleConfig(k=NEW, stride=3)
    prompts = runs.prompts[:2]
    kern = _run(
        model, prompts, _recycled(MoAAttention(plan, length=CACHE_LEN, block_q=16, block_k=16), cfg)
    )
    ref = _run(
        model,
        prompts,
        _recycled(MoAAttention(plan, length=CACHE_LEN, kernel_backend="reference"), cfg),
    )
    assert kern == ref


def _recycled(moa: MoAAttention, rc: RecycleConfig) -> RecycledAttention:
    """MoA prefill + recycled decode, the decode kernels on the prefill's backend."""
    return RecycledAttention(
        rc, prefill_moa=moa, kernel_backend=moa.kernel_backend, interpret=moa.interpret
    )


def test_cli_recycle_flags():
    cfg = tiny_config()
    config = GenerateConfig(recycle_k=8, recycle_stride=4, prefill_plan="dense")
    assert method_choice(config) == (
        "recycled",
        {"k": "8", "stride": "4", "prefill": "plan"},
        "dense",
    )
    b = attention_backend(config, cfg, Plan.uniform(2, 4, window=8), 64)
    assert isinstance(b, RecycledAttention) and b.prefill_moa.plan == Plan.uniform(2, 4, window=8)
    assert (b.config.k, b.config.stride) == (8, 4)
    same = GenerateConfig(method="recycled", method_opt=["k=8", "recycled.s=4"])
    assert attention_backend(same, cfg, None, 64).config == RecycleConfig(k=8, stride=4)
    with pytest.raises(SystemExit, match="--prefill-plan"):
        generate_main(["--recycle-k", "8", "--plan", "dense"])
    with pytest.raises(SystemExit, match="need --recycle-k"):
        generate_main(["--prefill-plan", "dense"])
    with pytest.raises(SystemExit, match="S <= K"):
        generate_main(["--recycle-k", "8", "--recycle-stride", "9"])
    with pytest.raises(SystemExit, match="not for --method h2o"):
        generate_main(["--recycle-k", "8", "--method", "h2o"])
    with pytest.raises(ValueError, match=r"recycled\.k='x': expected an integer"):
        generate_main(["--method", "recycled", "--method-opt", "k=x"])


@pytest.mark.gpu
def test_compiled_kernels_in_generate_on_device(model, runs):
    """On a GPU/TPU: recycled decode (fixed and dynamic) and the baselines through the
    compiled kernels give the tokens of the jnp oracles (f32 model)."""
    if jax.default_backend() not in ("gpu", "tpu"):
        pytest.skip("needs a GPU or TPU")
    prompts = runs.prompts
    for make in (
        lambda **kw: RecycledAttention(RecycleConfig(k=NEW, stride=3), **kw),
        lambda **kw: RecycledAttention(RecycleConfig(k=NEW, stride=2, dynamic_threshold=0.9), **kw),
        lambda **kw: StreamingAttention(NEW, **kw),
        lambda **kw: H2OAttention(NEW, **kw),
    ):
        assert _run(model, prompts, make()) == _run(model, prompts, make(**REF))
