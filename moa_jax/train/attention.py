"""How training picks its attention backend from the config (through the method registry,
`moa_jax.methods`, where every command builds its attention).

- `dense`: `TrainDenseAttention` (cuDNN flash attention on GPU in bf16; with `packing: segments`
  it masks across documents).
- `recycled`: Recycled Attention's continued-pretraining recipe (`RecycledTrainAttention.paper`):
  rows of `prefix_len + tail_len` tokens, the last `tail_len` see the `top_k` tokens selected per
  layer and KV head plus the tail. `refresh_stride > 0` uses the decoder's fixed schedule instead
  (a full row every `refresh_stride` tail tokens).
- `moa`: an MoA plan (`plan`: a file, 'dense' or `streaming:W:S`, read by `Plan.load`) through
  `MoAAttention`, i.e. the block-sparse Pallas kernel with its custom backward.

`--method NAME` is the same as `--attention NAME`; any registered method with a training form
(`Method.train`) can be chosen.
"""

from __future__ import annotations

import dataclasses

from moa_jax.config import ModelConfig
from moa_jax.methods import AttentionConfig, TrainAttentionConfig, build_train_attention
from moa_jax.models.attention import Attention
from moa_jax.plan import Plan
from moa_jax.train.config import TrainConfig


def make_attention(
    cfg: TrainConfig,
    mc: ModelConfig,
    *,
    top_k: int | None = None,
    stride: int | None = None,
    decode_eviction: bool | None = None,
) -> Attention:
    """The training attention for model `mc` (or an evaluation variant with another K /
    stride), built by the method registry (`moa_jax.methods.build_train_attention`)."""
    tc = TrainAttentionConfig(
        impl=cfg.attention_impl,
        segments=cfg.packing == "segments",
        prefix_len=cfg.prefix_len,
        tail_len=cfg.tail_len,
        top_k=top_k or cfg.top_k,
        stride=cfg.refresh_stride if stride is None else stride,
        pool_kernel=cfg.pool_kernel,
        decode_eviction=cfg.decode_eviction if decode_eviction is None else decode_eviction,
    )
    plan = load_plan(cfg, mc) if cfg.attention == "moa" else None
    ac = AttentionConfig(config=mc, plan=plan, kernel_backend=cfg.kernel_backend)
    return build_train_attention(cfg.attention, ac, tc, cfg.effective_seq_len())


def load_plan(cfg: TrainConfig, mc: ModelConfig):
    """The MoA plan of the config, checked against the model."""
    try:
        return Plan.load(cfg.plan, mc.num_layers, mc.num_heads).validate(mc)
    except FileNotFoundError as e:
        raise ValueError(f"plan {cfg.plan!r}: {e}") from None


def eval_attentions(cfg: TrainConfig, mc: ModelConfig) -> dict[str, Attention]:
    """Evaluation methods: the training attention (recycled: one per eval stride, at eval_top_k;
    with the decoder's eviction when `eval_decode_eviction` and the blocks fit in K) and dense
    attention."""
    out: dict[str, Attention] = {}
    if cfg.attention == "recycled":
        k = cfg.eval_top_k or cfg.top_k
        for s in cfg.eval_strides:
            name = f"recycled_K{k}" + (f"_stride{s}" if s else "")
            longest_block = (s - 1) if s else cfg.tail_len
            ev = cfg.eval_decode_eviction and longest_block <= k
            out[name] = make_attention(cfg, mc, top_k=k, stride=s, decode_eviction=ev)
    elif cfg.attention == "moa":
        out["moa"] = make_attention(cfg, mc)
    # evaluation rows are chunk-packed: no document masks
    dense = dataclasses.replace(
        cfg, attention="dense", packing="chunk", plan=None, seq_len=cfg.effective_seq_len()
    )
    out["dense"] = make_attention(dense, mc)
    return out
