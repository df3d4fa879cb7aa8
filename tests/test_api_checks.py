"""The public Python functions refuse what they cannot compute: a malformed argument raises
`ArrayError` (arrays: shape, dtype, values) or `ConfigError` (option values) with one line that
names it, never a result. One case per check, then a hypothesis fuzz per entry point that draws
one to three bad arguments at once and asserts the error names one of them.

The checks run before anything is computed (the kernels' on abstract shapes, `generate`'s on host
values before its jitted loop), so the inputs here are tiny NumPy arrays and nothing compiles.
The fuzz draws its bad values from the options' own domains (`boundary.bad_values`, as
tests/test_fuzz_cli.py does for the commands): 25 examples per entry point, 1000 in the `slow`
copies, `MOA_JAX_FUZZ_EXAMPLES` when set.
"""

from __future__ import annotations

import inspect
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moa_jax.generate as gen
from moa_jax.config import parse_dtype
from moa_jax.domains import FLAG, FRACTION, NON_NEGATIVE, POSITIVE, POWER_OF_TWO, Choice, Float, Int
from moa_jax.errors import ArrayError, ConfigError, UserError
from moa_jax.generate import generate
from moa_jax.models.attention import Attention
from moa_jax.models.registry import init_random, load_config, load_model
from moa_jax.models.weights import WeightsError, WeightsNotFoundError
from moa_jax.pallas_kernels import (
    BACKENDS,
    MoASchedule,
    SpanKVCache,
    full_step_decode,
    recycled_decode,
    span_decode,
    sparse_attention,
    sparse_attention_on_mesh,
)
from moa_jax.sampling import SamplingConfig

from boundary import bad_values, examples
from conftest import tiny_config

FUZZ_COUNTS = [
    pytest.param(examples(25), id="default"),
    pytest.param(examples(1000), id="many", marks=pytest.mark.slow),
]
F32, BF16, I32 = np.float32, jnp.bfloat16, np.int32
NAN, INF = float("nan"), float("inf")

# prefill: B=1, T=S=4, H=2 query heads over Hkv=1, D=8
B, T, H, HKV, D = 1, 4, 2, 1, 8
Q, KV = np.zeros((B, T, H, D), F32), np.zeros((B, T, HKV, D), F32)
# decode: N=16 slots
N = 16
QD, KD = np.zeros((B, H, D), F32), np.zeros((B, HKV, N, D), F32)
KD24 = np.zeros((B, HKV, 24, D), F32)  # N = 24: block_k 12 divides it
QPOS, POS = np.full((B,), 5, I32), np.arange(N, dtype=I32)[None, None].repeat(B, 0)
SCHED = MoASchedule.build((4, 8), (0, 2), HKV, N, block=8)


def _cache(k=None, v=None, pos=None, schedule=SCHED) -> SpanKVCache:
    m = schedule.slots
    return SpanKVCache(
        np.zeros((B, m, D), F32) if k is None else k,
        np.zeros((B, m, D), F32) if v is None else v,
        np.zeros((B, m), I32) if pos is None else pos,
        schedule,
    )


@pytest.fixture(scope="module")
def model():
    return init_random(tiny_config(), seed=0)  # vocab 128


def _no_compile():
    """`generate` must refuse before its jitted loop is reached."""
    return mock.patch.object(gen, "_generate_jit", lambda *a, **k: pytest.fail("compiled"))


def _refused(fn, exc: type[UserError], *words: str) -> str:
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------- one case per check
def _sa(**kw):
    """sparse_attention's arguments: the valid ones, with `kw` replaced."""
    return ("sparse_attention", dict(q=Q, k=KV, v=KV, windows=(4, 4)) | kw)


def _call(fn_args, backend=None):
    """Calls the function of `fn_args` (`_sa`, `_fs`, ...) with `backend` unless it names one."""
    name, kw = fn_args
    kw = dict(kw)
    if backend is not None:
        kw.setdefault("backend", backend)
    fn, positional = ENTRY_POINTS[name]
    args = [kw.pop(p) for p in positional]
    return fn(*args, **kw)


PREFILL_CASES = [
    # arrays
    ("q_rank", _sa(q=Q[0]), ArrayError, "sparse_attention: q must be a 4-d array"),
    ("q_empty", _sa(q=Q[:, :0]), ArrayError, "sparse_attention: q must be a 4-d array"),
    ("q_list", _sa(q=Q.tolist()), ArrayError, "sparse_attention: q must be an array"),
    ("k_rank", _sa(k=KV[0]), ArrayError, "sparse_attention: k must be a 4-d array"),
    ("v_rank", _sa(v=KV[0]), ArrayError, "sparse_attention: v must be a 4-d array"),
    ("v_len", _sa(v=np.zeros((B, T + 1, HKV, D), F32)), ArrayError, "v has shape"),
    ("k_batch", _sa(k=np.zeros((2, T, HKV, D), F32), v=np.zeros((2, T, HKV, D), F32)),
     ArrayError, "k has batch 2 but q has 1"),
    ("k_head_dim", _sa(k=np.zeros((B, T, HKV, 2 * D), F32), v=np.zeros((B, T, HKV, 2 * D), F32)),
     ArrayError, "k has head_dim 16 but q has 8"),
    ("kv_heads", _sa(k=np.zeros((B, T, 3, D), F32), v=np.zeros((B, T, 3, D), F32)),
     ArrayError, "k has 3 KV heads, which do not divide the 2 query heads of q (query heads must "
     "be a multiple of KV heads"),
    ("q_int", _sa(q=Q.astype(I32)), ArrayError, "q must have a floating dtype"),
    ("k_dtype", _sa(k=KV.astype(BF16), v=KV.astype(BF16)), ArrayError,
     "k is bfloat16 but q is float32"),
    ("kv_lengths_dtype", _sa(kv_lengths=np.ones((B,), F32)), ArrayError,
     "kv_lengths must be int [B]"),
    ("kv_lengths_shape", _sa(kv_lengths=np.ones((B, 1), I32)), ArrayError,
     "kv_lengths must be int [B]"),
    # options
    ("windows_zero", _sa(windows=(4, 0)), ConfigError, "windows[1] must be an integer >= 1, got 0"),
    ("windows_negative", _sa(windows=(-3, 4)), ConfigError,
     "windows[0] must be an integer >= 1, got -3"),
    ("windows_fraction", _sa(windows=(0.5, 4)), ConfigError,
     "windows[0] must be an integer >= 1, got 0.5"),
    ("windows_nan", _sa(windows=(NAN, 4)), ConfigError,
     "windows[0] must be an integer >= 1, got nan"),
    ("windows_bool", _sa(windows=(True, 4)), ConfigError,
     "windows[0] must be an integer >= 1, got True"),
    ("windows_count", _sa(windows=(4,)), ConfigError, "windows gives 1 windows for 2 query heads"),
    ("windows_scalar", _sa(windows=4), ConfigError, "windows must be a sequence"),
    ("sink_negative", _sa(sink=-1), ConfigError, "sink must be an integer >= 0, got -1"),
    ("sink_fraction", _sa(sink=(0, 1.5)), ConfigError, "sink[1] must be an integer >= 0, got 1.5"),
    ("sink_count", _sa(sink=(0, 0, 0)), ConfigError, "sink gives 3 sinks for 2 query heads"),
    ("q_offset", _sa(q_offset=-1), ConfigError, "q_offset must be an integer >= 0, got -1"),
    ("q_offset_float", _sa(q_offset=2.5), ConfigError, "q_offset must be an integer >= 0, got 2.5"),
    ("scale_zero", _sa(scale=0.0), ConfigError, "scale must be a finite number > 0, got 0"),
    ("scale_nan", _sa(scale=NAN), ConfigError, "scale must be a finite number > 0, got nan"),
    ("block_q", _sa(block_q=48), ConfigError,
     "block_q must be an integer >= 1, a power of two, got 48"),
    ("block_k", _sa(block_k=0), ConfigError,
     "block_k must be an integer >= 1, a power of two, got 0"),
    ("backend", _sa(backend="cuda"), ConfigError, "backend must be one of"),
    ("interpret", _sa(interpret="yes"), ConfigError, "interpret must be true or false, got 'yes'"),
    ("return_lse", _sa(return_lse=1), ConfigError, "return_lse must be true or false, got 1"),
    ("unknown_option", _sa(num_wraps=4), ConfigError, "unknown kernel options ['num_wraps']"),
    ("option_value", _sa(num_warps=3), ConfigError,
     "num_warps must be an integer >= 1, a power of two, got 3"),
    ("option_stages", _sa(num_stages=0), ConfigError, "num_stages must be an integer >= 1, got 0"),
    ("option_of_another_kernel", _sa(backend="gpu", num_stages_dkv=3), ConfigError,
     "the 'gpu' kernel does not take the kernel options ['num_stages_dkv']"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_sparse_attention_checks(case, backend):
    """Every backend refuses the same arguments (the checks run before one is chosen)."""
    _, fn_args, exc, words = case
    _refused(lambda: _call(fn_args, backend), exc, words)


def test_traced_window_is_refused():
    """Windows are static: a traced value is not an integer."""
    _refused(
        lambda: jax.jit(lambda q, w: sparse_attention(q, KV, KV, windows=(w, 4)))(Q, 3),
        ConfigError,
        "windows[0] must be an integer >= 1, got JitTracer",
    )


def test_on_mesh_checks_every_head_before_splitting():
    """A windows list longer than the heads is refused, not cut to the first H entries."""
    _refused(
        lambda: sparse_attention_on_mesh(Q, KV, KV, None, windows=(4, 4, 1), sinks=(0, 0)),
        ConfigError,
        "sparse_attention_on_mesh: windows gives 3 windows for 2 query heads",
    )


def test_lowering_for_names_its_target():
    from moa_jax.pallas_kernels.dispatch import lowering_for

    def enter():
        with lowering_for("cuda"):
            pass

    _refused(enter, ConfigError, "lowering_for: target takes 'gpu' or 'tpu', got 'cuda'")


def _fs(**kw):
    return ("full_step_decode", dict(q=QD, k=KD, v=KD, q_positions=QPOS) | kw)


def _rc(**kw):
    return ("recycled_decode", dict(q=QD, k=KD, v=KD, pos=POS, q_positions=QPOS) | kw)


def _sd(**kw):
    return ("span_decode", dict(q=QD, cache=_cache(), q_positions=QPOS) | kw)


ENTRY_POINTS = {
    "sparse_attention": (sparse_attention, ("q", "k", "v")),
    "full_step_decode": (full_step_decode, ("q", "k", "v", "q_positions")),
    "recycled_decode": (recycled_decode, ("q", "k", "v", "pos", "q_positions")),
    "span_decode": (span_decode, ("q", "cache", "q_positions")),
}


DECODE_CASES = [
    ("full_q_rank", _fs(q=QD[0]), ArrayError, "full_step_decode: q must be a 3-d array"),
    ("full_v_shape", _fs(v=KD[:, :, :8]), ArrayError, "full_step_decode: v has shape"),
    ("full_k_batch", _fs(k=KD.repeat(2, 0), v=KD.repeat(2, 0)), ArrayError, "k has batch 2"),
    ("full_k_head_dim", _fs(k=KD[..., :4], v=KD[..., :4]), ArrayError, "k has head_dim 4"),
    ("full_kv_heads", _fs(k=KD.repeat(3, 1), v=KD.repeat(3, 1)), ArrayError,
     "k has 3 KV heads, which do not divide"),
    ("full_dtype", _fs(k=KD.astype(BF16), v=KD.astype(BF16)), ArrayError, "k is bfloat16"),
    ("full_q_positions", _fs(q_positions=QPOS.astype(F32)), ArrayError,
     "full_step_decode: q_positions must be int [B]"),
    ("full_scores", _fs(scores="mean"), ConfigError, "full_step_decode: scores must be one of"),
    ("full_window", _fs(window=0), ConfigError,
     "full_step_decode: window must be an integer >= 1, got 0"),
    ("full_window_float", _fs(window=1.5), ConfigError,
     "full_step_decode: window must be an integer >= 1, got 1.5"),
    ("full_block_k", _fs(block_k=0), ConfigError,
     "full_step_decode: block_k must be an integer >= 1, got 0"),
    ("full_block_k_pow2", _fs(k=KD24, v=KD24, block_k=12), ConfigError,
     "full_step_decode: block_k must be an integer >= 1, a power of two, got 12"),
    ("full_block_k_divides", _fs(block_k=32), ConfigError,
     "full_step_decode: block_k 32 does not divide the cache's 16 slots (N)"),
    ("full_num_splits", _fs(num_splits=0), ConfigError,
     "num_splits must be an integer >= 1, got 0"),
    ("full_num_warps", _fs(num_warps=6), ConfigError,
     "num_warps must be an integer >= 1, a power of two, got 6"),
    ("full_scale", _fs(scale=-1.0), ConfigError,
     "full_step_decode: scale must be a finite number > 0, got -1"),
    ("full_backend", _fs(backend="triton"), ConfigError, "full_step_decode: backend must be"),
    ("rec_pos_dtype", _rc(pos=POS.astype(F32)), ArrayError, "recycled_decode: pos must be int"),
    ("rec_pos_shape", _rc(pos=POS[:, :, :8]), ArrayError, "recycled_decode: pos must be int"),
    ("rec_pos_none", _rc(pos=None), ArrayError, "recycled_decode: pos is required"),
    ("rec_new_alone", _rc(k_new=QD[:, :1]), ArrayError, "k_new and v_new go together"),
    ("rec_new_shape", _rc(k_new=QD, v_new=QD), ArrayError, "k_new must be [B, Hkv, D]"),
    ("rec_new_dtype", _rc(k_new=QD[:, :1].astype(BF16), v_new=QD[:, :1].astype(BF16)),
     ArrayError, "k_new is bfloat16"),
    ("span_q_rank", _sd(q=Q), ArrayError, "span_decode: q must be a 3-d array"),
    ("span_cache_type", _sd(cache=(QD, QD)), ArrayError, "cache must be a SpanKVCache"),
    ("span_heads", _sd(q=np.zeros((B, 4, D), F32)), ArrayError,
     "span_decode: q has 4 query heads but the cache's schedule has 2; it needs one window and "
     "sink per query head"),
    ("span_v_shape", _sd(cache=_cache(v=np.zeros((B, 8, D), F32))), ArrayError,
     "cache.v has shape"),
    ("span_batch", _sd(cache=_cache(np.zeros((2, 16, D), F32), np.zeros((2, 16, D), F32),
                                    np.zeros((2, 16), I32))), ArrayError, "cache.k has batch 2"),
    ("span_head_dim", _sd(cache=_cache(np.zeros((B, 16, 4), F32), np.zeros((B, 16, 4), F32))),
     ArrayError, "cache.k has head_dim 4"),
    ("span_pos", _sd(cache=_cache(pos=np.zeros((B, 16), F32))), ArrayError,
     "cache.pos must be int [B, M]"),
    ("span_dtype", _sd(q=QD.astype(BF16)), ArrayError, "cache.k is float32 but q is bfloat16"),
    ("span_q_positions", _sd(q_positions=np.zeros((2,), I32)), ArrayError,
     "span_decode: q_positions must be int [B]"),
    ("span_per_split", _sd(per_split=0), ConfigError,
     "span_decode: per_split must be an integer >= 1, got 0"),
    ("span_num_warps", _sd(num_warps=0), ConfigError,
     "span_decode: num_warps must be an integer >= 1, a power of two"),
    ("span_interpret", _sd(interpret=0), ConfigError,
     "span_decode: interpret must be true or false, got 0"),
    ("span_scale", _sd(scale=INF), ConfigError,
     "span_decode: scale must be a finite number > 0, got inf"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_checks(case, backend):
    _, fn_args, exc, words = case
    _refused(lambda: _call(fn_args, backend), exc, words)


def _gen(**kw):
    return kw


GENERATE_CASES = [
    ("ids_too_large", _gen(prompts=[[5, 600]]), ArrayError,
     "generate: prompt token ids must be in [0, 128) (the model's vocab_size), got 600 in "
     "prompts[0]"),
    ("ids_negative", _gen(prompts=[[5], [-1]]), ArrayError, "got -1 in prompts[1]"),
    ("ids_float", _gen(prompts=[[5.0, 6.0]]), ArrayError, "prompts[0] must hold int token ids"),
    ("ids_bool", _gen(prompts=[[True]]), ArrayError, "prompts[0] holds booleans"),
    ("prompt_empty", _gen(prompts=[[5], []]), ArrayError, "prompts[1] is empty"),
    ("prompts_empty", _gen(prompts=[]), ArrayError, "generate: no prompts given"),
    ("prompts_flat", _gen(prompts=[5, 6]), ArrayError, "prompts[0] must be a 1-d list"),
    ("prompts_1d_array", _gen(prompts=np.array([5, 6])), ArrayError, "got a 1-d array"),
    ("prompts_str", _gen(prompts="hi"), ArrayError, "generate: prompts must be"),
    ("prompt_str", _gen(prompts=["hi"]), ArrayError, "prompts[0] is a string"),
    ("pad_id_out_of_vocab", _gen(pad_id=600), ConfigError,
     "generate: pad_id must be an integer in [0, 127], got 600"),
    ("pad_id_float", _gen(pad_id=1.5), ConfigError,
     "generate: pad_id must be an integer in [0, 127], got 1.5"),
    ("stop_ids_out_of_vocab", _gen(stop_ids=(3, 128)), ConfigError,
     "generate: stop_ids[1] must be an integer in [0, 127], got 128"),
    ("stop_ids_int", _gen(stop_ids=3), ConfigError, "generate: stop_ids must be a sequence"),
    ("max_new_tokens_zero", _gen(max_new_tokens=0), ConfigError,
     "generate: max_new_tokens must be an integer >= 1, got 0"),
    ("max_new_tokens_bool", _gen(max_new_tokens=True), ConfigError,
     "generate: max_new_tokens must be an integer >= 1, got True"),
    ("max_cache_len_zero", _gen(max_cache_len=0), ConfigError,
     "generate: max_cache_len must be an integer >= 1, got 0"),
    ("sampling_type", _gen(sampling={"temperature": 1.0}), ConfigError,
     "generate: sampling must be a SamplingConfig"),
    ("key_missing", _gen(sampling=SamplingConfig(temperature=0.5)), ConfigError,
     "needs an explicit PRNG `key`"),
    ("key_type", _gen(sampling=SamplingConfig(temperature=0.5), key=3), ArrayError,
     "generate: key must be one PRNG key"),
    ("attention_stateless", _gen(attention=mock.Mock(spec=Attention)), ConfigError,
     "generate: attention must be a CachedAttention"),
    ("on_token", _gen(on_token=3), ConfigError, "generate: on_token must be callable"),
    ("scan_layers", _gen(scan_layers="yes"), ConfigError,
     "generate: scan_layers must be true or false"),
]  # fmt: skip


@pytest.mark.parametrize("case", GENERATE_CASES, ids=[c[0] for c in GENERATE_CASES])
def test_generate_checks(model, case):
    _, kw, exc, words = case
    kw = dict(kw)
    prompts = kw.pop("prompts", [[5, 6, 7]])
    with _no_compile():
        _refused(lambda: generate(model, prompts, max_new_tokens=kw.pop("max_new_tokens", 2), **kw),
                 exc, words)  # fmt: skip


def test_generate_config_defaults_are_checked_too(model):
    """pad_id and stop_ids default to the config's; one outside the vocabulary is named."""
    import dataclasses

    bad = init_random(dataclasses.replace(tiny_config(), pad_token_id=600), seed=0)
    with _no_compile():
        _refused(lambda: generate(bad, [[5]]), ConfigError, "pad_id (the config's pad_token_id)")
    bad = init_random(dataclasses.replace(tiny_config(), eos_token_ids=(-2,)), seed=0)
    with _no_compile():
        _refused(lambda: generate(bad, [[5]]), ConfigError, "stop_ids (the config's eos_token_ids)")


SAMPLING_CASES = [
    (dict(temperature=NAN), "SamplingConfig.temperature must be a finite number >= 0, got nan"),
    (dict(temperature=INF), "SamplingConfig.temperature must be a finite number >= 0, got inf"),
    (dict(temperature=-0.5), "SamplingConfig.temperature must be a finite number >= 0, got -0.5"),
    (dict(temperature="hot"), "SamplingConfig.temperature must be a finite number >= 0, got 'hot'"),
    (dict(top_k=2.5), "SamplingConfig.top_k must be an integer >= 0, got 2.5"),
    (dict(top_k=True), "SamplingConfig.top_k must be an integer >= 0, got True"),
    (dict(top_k=-1), "SamplingConfig.top_k must be an integer >= 0, got -1"),
    (dict(top_p=NAN), "SamplingConfig.top_p must be a finite number in (0, 1], got nan"),
    (dict(top_p=0.0), "SamplingConfig.top_p must be a finite number in (0, 1], got 0"),
    (dict(top_p=1.5), "SamplingConfig.top_p must be a finite number in (0, 1], got 1.5"),
]


@pytest.mark.parametrize("kw, words", SAMPLING_CASES)
def test_sampling_config_checks(kw, words):
    _refused(lambda: SamplingConfig(**kw), ConfigError, words)


def test_sampling_config_normalises_numbers():
    """Integral numbers are stored as the field's type (so equal configs hash equal under jit)."""
    c = SamplingConfig(temperature=1, top_k=np.int64(5), top_p=1)
    assert (c.temperature, c.top_k, c.top_p) == (1.0, 5, 1.0) and type(c.top_k) is int
    assert c == SamplingConfig(temperature=1.0, top_k=5, top_p=1.0)


def test_load_model_checks(tmp_path):
    presets = "preset (smollm2-135m, tiny-random)"
    _refused(lambda: load_model("no-such-model"), ConfigError, "load_model: unknown model", presets)
    _refused(lambda: load_config("no-such-model"), ConfigError, "load_config: unknown model")
    _refused(lambda: load_model(str(tmp_path / "m.gguf")), WeightsNotFoundError, "no such file")
    _refused(lambda: load_model(tmp_path), WeightsNotFoundError, "no config.json", presets)
    (tmp_path / "w.bin").write_bytes(b"x")
    _refused(lambda: load_model(tmp_path / "w.bin"), WeightsError, "not a .gguf", presets)
    _refused(lambda: load_model(3), ConfigError, "load_model: name_or_path must be")
    _refused(lambda: load_model("tiny-random", dtype="float8"), ConfigError,
             "load_model: dtype: unknown dtype name 'float8'")  # fmt: skip
    _refused(lambda: load_model("tiny-random", param_dtype=np.int32), ConfigError,
             "load_model: param_dtype must be a floating dtype")  # fmt: skip
    _refused(lambda: parse_dtype("float33"), ConfigError, "unknown dtype name 'float33'")


def test_model_calls_check_token_arrays(model):
    """The model's own entry points: token and position arrays of the documented layout."""
    toks, pos = np.zeros((1, 4), I32), np.arange(4, dtype=I32)[None]
    _refused(lambda: model(toks.astype(F32), pos), ArrayError, "DecoderLM: tokens must be int")
    _refused(lambda: model(toks, pos[:, :3]), ArrayError, "DecoderLM: positions must be int")
    _refused(lambda: model(toks, pos, lengths=np.ones((2,), I32)), ArrayError,
             "DecoderLM: lengths must be int [B]")  # fmt: skip
    _refused(lambda: model.decode_token(toks, pos, None, None), ArrayError,
             "DecoderLM.decode_token: tokens must be int [B]")  # fmt: skip
    _refused(lambda: model.logits(np.zeros((1, 4, 64), F32), at=np.zeros((2,), I32)), ArrayError,
             "DecoderLM.logits: at must be int")  # fmt: skip


# ------------------------------------------------------------------------------------- fuzz
def fuzz_settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=n < 100,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


SCALE, TEMPERATURE = Float(0.0, lo_open=True), Float(0.0)
bad_pow2 = st.one_of(bad_values(POWER_OF_TWO), st.integers(3, 4096).filter(lambda x: x & (x - 1)))
bad_scalars = st.one_of(st.integers(), st.floats(), st.text(max_size=4), st.none())


def per_head_of(bad_value, heads: int):
    """A per-head list with one bad entry, or a list of the wrong length."""
    return st.one_of(
        st.tuples(st.integers(0, heads - 1), bad_value).map(
            lambda iv: tuple(iv[1] if i == iv[0] else 4 for i in range(heads))
        ),
        st.lists(st.integers(1, 64), min_size=0, max_size=6)
        .filter(lambda ws: len(ws) != heads)
        .map(tuple),
    )


def set_arg(name):
    return lambda kw, x: kw.__setitem__(name, x)


def fuzz(n: int, base, slots, call):
    """Draws 1-3 distinct slots, applies a bad value of each to `base()` and calls `call(kw)`:
    it must raise the exception type of one drawn slot, with that slot's words in the message.

    slots: {name: (values strategy, apply(kw, value), exception type, words or words(value))}.
    """

    @fuzz_settings(n)
    @given(data=st.data())
    def check(data):
        names = data.draw(
            st.lists(st.sampled_from(sorted(slots)), min_size=1, max_size=3, unique=True),
            label="slots",
        )
        kw, expected = base(), []
        for name in names:
            values, apply, exc, words = slots[name]
            value = data.draw(values, label=name)
            apply(kw, value)
            expected.append((exc, words(value) if callable(words) else words))
        with pytest.raises(UserError) as e:
            call(kw)
        msg = str(e.value)
        assert "\n" not in msg, msg
        assert any(isinstance(e.value, exc) and w in msg for exc, w in expected), (
            f"{names}: {type(e.value).__name__}: {msg}"
        )

    check()


def _array_slot(fn, words, exc=ArrayError):
    """A slot that reshapes / retypes the array specs (kw['shapes'], kw['dtypes'])."""
    return (st.just(None), lambda kw, _: fn(kw), exc, words)


def _resize(*names, axis, size):
    def fn(kw):
        for n in names:
            kw["shapes"][n][axis] = size

    return fn


def _retype(*names, dtype):
    def fn(kw):
        for n in names:
            kw["dtypes"][n] = dtype

    return fn


KNOWN_PREFILL_OPTIONS = {
    "block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv", "num_warps", "num_stages",
    "num_warps_bwd", "num_stages_bwd", "num_stages_dq", "num_stages_dkv", "poison",
}  # fmt: skip
PREFILL_PARAMS = set(inspect.signature(sparse_attention).parameters) | {"shapes", "dtypes"}
POW2_OPTIONS = sorted(o for o in KNOWN_PREFILL_OPTIONS if o.startswith(("block_", "num_warps")))
STAGES_OPTIONS = sorted(o for o in KNOWN_PREFILL_OPTIONS if o.startswith("num_stages"))

PREFILL_SLOTS = {
    "windows": (st.one_of(per_head_of(bad_values(POSITIVE), H), bad_scalars), set_arg("windows"),
                ConfigError, "sparse_attention: windows"),
    "sink": (st.one_of(per_head_of(bad_values(NON_NEGATIVE), H),
                     bad_values(NON_NEGATIVE).filter(lambda x: not isinstance(x, list))),
             set_arg("sink"), ConfigError, "sparse_attention: sink"),
    "q_offset": (bad_values(NON_NEGATIVE), set_arg("q_offset"), ConfigError,
                 "sparse_attention: q_offset"),
    "scale": (bad_values(SCALE), set_arg("scale"), ConfigError, "sparse_attention: scale"),
    "block_q": (bad_pow2, set_arg("block_q"), ConfigError, "sparse_attention: block_q"),
    "block_k": (bad_pow2, set_arg("block_k"), ConfigError, "sparse_attention: block_k"),
    "backend": (bad_values(Choice(*BACKENDS)), set_arg("backend"), ConfigError,
                "sparse_attention: backend"),
    "interpret": (bad_values(FLAG), set_arg("interpret"), ConfigError,
                  "sparse_attention: interpret"),
    "return_lse": (bad_values(FLAG), set_arg("return_lse"), ConfigError,
                   "sparse_attention: return_lse"),
    "option": (st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(
                   lambda s: s not in KNOWN_PREFILL_OPTIONS | PREFILL_PARAMS),
               lambda kw, name: kw.__setitem__(name, 1), ConfigError, "unknown kernel options"),
    "option_value": (
        st.one_of(
            st.tuples(st.sampled_from(POW2_OPTIONS), bad_pow2),
            st.tuples(st.sampled_from(STAGES_OPTIONS), bad_values(POSITIVE)),
        ),
        lambda kw, nv: kw.__setitem__(*nv), ConfigError, lambda nv: f"sparse_attention: {nv[0]}",
    ),
    "kv_lengths": (st.sampled_from([np.ones((B,), F32), np.ones((B + 1,), I32),
                                    np.ones((B, 1), I32), [4], 4]),
                   set_arg("kv_lengths"), ArrayError, "sparse_attention: kv_lengths"),
    "q_rank": _array_slot(lambda kw: kw["shapes"]["q"].pop(), "q must be a 4-d"),
    "q_empty": _array_slot(_resize("q", axis=1, size=0), "q must be a 4-d"),
    "q_int": _array_slot(_retype("q", dtype=I32), "q must have a floating dtype"),
    "kv_dtype": _array_slot(_retype("k", "v", dtype=BF16), "k is bfloat16 but q is"),
    "kv_batch": _array_slot(_resize("k", "v", axis=0, size=B + 1), "k has batch"),
    "kv_head_dim": _array_slot(_resize("k", "v", axis=3, size=D + 2), "k has head_dim"),
    "kv_heads": _array_slot(_resize("k", "v", axis=2, size=3), "k has 3 KV heads, which"),
    "v_len": _array_slot(_resize("v", axis=1, size=T + 3), "v has shape"),
}  # fmt: skip


def _prefill_base(backend):
    def base():
        return dict(
            shapes={"q": [B, T, H, D], "k": [B, T, HKV, D], "v": [B, T, HKV, D]},
            dtypes={"q": F32, "k": F32, "v": F32},
            windows=(4, 2),
            sink=(0, 1),
            backend=backend,
        )

    return base


def _call_prefill(kw):
    shapes, dtypes = kw.pop("shapes"), kw.pop("dtypes")
    q, k, v = (np.zeros(shapes[n], dtypes[n]) for n in "qkv")
    sparse_attention(q, k, v, **kw)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("n", FUZZ_COUNTS)
def test_sparse_attention_fuzz(n, backend):
    """'auto' on this machine is the Triton kernel in interpret mode (a CPU) or the GPU's."""
    fuzz(n, _prefill_base(backend), PREFILL_SLOTS, _call_prefill)


def _set_cache(field):
    def apply(kw, value):
        c = kw["cache"]
        if isinstance(c, SpanKVCache):  # (not when another slot put a non-cache there)
            kw["cache"] = SpanKVCache(**{"k": c.k, "v": c.v, "pos": c.pos, "schedule": c.schedule,
                                         field: value})  # fmt: skip

    return apply


def _decode_slots(op):
    """Bad arguments of the decode entry point `op`."""
    common = {
        "q_positions": (
            st.sampled_from(
                [QPOS.astype(F32), np.zeros((B + 1,), I32), np.zeros((B, 1), I32), 5, [5]]
            ),
            set_arg("q_positions"),
            ArrayError,
            f"{op}: q_positions",
        ),
        "scale": (bad_values(SCALE), set_arg("scale"), ConfigError, f"{op}: scale"),
        "num_warps": (bad_pow2, set_arg("num_warps"), ConfigError, f"{op}: num_warps"),
        "backend": (
            bad_values(Choice(*BACKENDS)),
            set_arg("backend"),
            ConfigError,
            f"{op}: backend",
        ),
        "interpret": (bad_values(FLAG), set_arg("interpret"), ConfigError, f"{op}: interpret"),
        "q_rank": (
            st.sampled_from([QD[0], QD[..., None], Q, QD.tolist()]),
            set_arg("q"),
            ArrayError,
            f"{op}: q must be",
        ),
        "q_int": (
            st.just(QD.astype(I32)),
            set_arg("q"),
            ArrayError,
            f"{op}: q must have a floating dtype",
        ),
    }
    if op == "span_decode":
        return common | {
            "per_split": (bad_values(POSITIVE), set_arg("per_split"),
                          ConfigError, "span_decode: per_split"),
            "heads": (st.sampled_from([1, 3, 4]).map(lambda h: np.zeros((B, h, D), F32)),
                      set_arg("q"), ArrayError, "span_decode: q has"),
            "cache_v": (st.sampled_from([np.zeros((B, 8, D), F32), np.zeros((B, 16, D), BF16),
                                         np.zeros((B, 16, D, 1), F32)]),
                        _set_cache("v"), ArrayError, "span_decode: cache.v"),
            "cache_pos": (st.sampled_from([np.zeros((B, 16), F32), np.zeros((B, 8), I32)]),
                          _set_cache("pos"), ArrayError, "span_decode: cache.pos"),
            "cache": (st.sampled_from([None, (QD, QD), {"k": QD}]), set_arg("cache"),
                      ArrayError, "span_decode: cache must be a SpanKVCache"),
        }  # fmt: skip
    slots = common | {
        "scores": (st.one_of(st.text(max_size=5), st.sampled_from([1, "MAX", ()])),
                   set_arg("scores"), ConfigError, f"{op}: scores"),
        "window": (bad_values(POSITIVE), set_arg("window"), ConfigError,
                   f"{op}: window"),
        "num_splits": (bad_values(POSITIVE), set_arg("num_splits"),
                       ConfigError, f"{op}: num_splits"),
        "block_k": (st.one_of(bad_pow2, st.sampled_from([32, 64, 1024])), set_arg("block_k"),
                    ConfigError, f"{op}: block_k"),
        "v": (st.sampled_from([KD[:, :, :8], KD[..., :4], KD.astype(BF16), KD[0]]),
              set_arg("v"), ArrayError, f"{op}: v"),
        "kv_heads": (st.just(KD.repeat(3, 1)), lambda kw, x: kw.update(k=x, v=x), ArrayError,
                     f"{op}: k has 3 KV heads"),
        "kv_batch": (st.just(KD.repeat(2, 0)), lambda kw, x: kw.update(k=x, v=x), ArrayError,
                     f"{op}: k has batch"),
    }  # fmt: skip
    if op == "recycled_decode":
        slots |= {
            "pos": (st.sampled_from([POS.astype(F32), POS[:, :, :8], POS[0], None]),
                    set_arg("pos"), ArrayError, "recycled_decode: pos"),
            "k_new": (st.sampled_from([(QD[:, :1], None), (None, QD[:, :1]), (QD, QD),
                                       (QD[:, :1].astype(BF16),) * 2]),
                      lambda kw, kv: kw.update(k_new=kv[0], v_new=kv[1]), ArrayError, "_new"),
        }  # fmt: skip
    return slots


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("op", ["full_step_decode", "recycled_decode", "span_decode"])
@pytest.mark.parametrize("n", FUZZ_COUNTS)
def test_decode_fuzz(n, op, backend):
    base = {"full_step_decode": _fs, "recycled_decode": _rc, "span_decode": _sd}[op]
    fuzz(n, lambda: dict(base(backend=backend)[1]), _decode_slots(op),
         lambda kw: _call((op, kw)))  # fmt: skip


VOCAB = tiny_config().vocab_size
TOKEN_ID = Int(0, VOCAB - 1)
bad_ids = st.one_of(st.integers(-(2**62), -1), st.integers(VOCAB, 2**62))


def _prompts_with(kind):
    """prompts whose row 1 is bad (`kind`)."""
    rows = {
        "id": bad_ids.map(lambda t: [[5, 6], [7, t]]),
        "float": st.floats(0, VOCAB - 1).map(lambda t: [[5, 6], [t]]),
        "empty": st.just([[5], []]),
        "bool": st.booleans().map(lambda b: [[5], [b, 6]]),
        "nested": st.just([[5], [[6, 7]]]),
    }
    return rows[kind]


GENERATE_SLOTS = {
    "prompt_ids": (st.one_of(_prompts_with("id"), bad_ids.map(lambda t: np.array([[5, t]]))),
                   set_arg("prompts"), ArrayError, "generate: prompt token ids must be in"),
    "prompt_rows": (st.one_of(*(_prompts_with(k) for k in ("float", "empty", "bool", "nested"))),
                    set_arg("prompts"), ArrayError, "generate: prompts[1]"),
    "prompts": (st.sampled_from([[], "abc", 5, [5, 6], np.array([5, 6]), np.zeros((1, 2, 2), I32)]),
                set_arg("prompts"), ArrayError, "prompts"),
    "pad_id": (bad_values(TOKEN_ID), set_arg("pad_id"),
               ConfigError, "generate: pad_id"),
    "stop_ids": (st.one_of(bad_values(TOKEN_ID).map(lambda t: (3, t)),
                           st.sampled_from([3, "3", 3.0])),
                 set_arg("stop_ids"), ConfigError, "generate: stop_ids"),
    "max_new_tokens": (bad_values(POSITIVE), set_arg("max_new_tokens"), ConfigError,
                       "generate: max_new_tokens"),
    "max_cache_len": (bad_values(POSITIVE), set_arg("max_cache_len"),
                      ConfigError, "generate: max_cache_len"),
    "temperature": (bad_values(TEMPERATURE),
                    lambda kw, x: kw.update(sampling=dict(temperature=x)), ConfigError,
                    "SamplingConfig.temperature"),
    "top_k": (bad_values(NON_NEGATIVE),
              lambda kw, x: kw.update(sampling=dict(temperature=1.0, top_k=x)), ConfigError,
              "SamplingConfig.top_k"),
    "top_p": (bad_values(FRACTION),
              lambda kw, x: kw.update(sampling=dict(temperature=1.0, top_p=x)), ConfigError,
              "SamplingConfig.top_p"),
    "key": (st.sampled_from([None, 3, np.zeros(3, np.uint32), np.zeros((2, 2), np.uint32)]),
            lambda kw, x: kw.update(key=x, sampling=kw.get("sampling") or dict(temperature=1.0)),
            UserError, "key"),
}  # fmt: skip


@pytest.mark.parametrize("n", FUZZ_COUNTS)
def test_generate_fuzz(model, n):
    """Out-of-domain ids, pad and stop ids, lengths and sampling values: refused before the
    jitted loop is reached (nothing compiles)."""

    def call(kw):
        if "sampling" in kw:  # built here: SamplingConfig checks its fields when made
            kw["sampling"] = SamplingConfig(**kw["sampling"])
        generate(model, kw.pop("prompts"), **kw)

    with _no_compile():
        fuzz(n, lambda: dict(prompts=[[5, 6, 7]], max_new_tokens=2), GENERATE_SLOTS, call)
