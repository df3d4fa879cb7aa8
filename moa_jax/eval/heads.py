"""Which heads retrieve? Attention mass on the needle per head, and the oracle plan it implies.

    python -m moa_jax.eval.heads --lengths 2048 4096 8192 --num-items 20 --out heads/
    python -m moa_jax.eval.heads ... --plan plan.json --profile-dir runs/profile/x/profiles

For passkey items (the evaluation's `needle` task, built with a seed of its own so that they are
not the evaluation's items) the dense model reads the prompt and the gold passkey digits
(teacher-forced); per layer and query head the retrieval score is the attention probability that
the queries predicting the digits put on the needle's digit tokens, averaged over those queries
and over the items. Heads whose score is high are the heads that copy the passkey.

From the scores, the **oracle plan** at KV-cache density d: the KV groups with the largest score
(a group's score is its query heads' maximum, as the span cache keeps a group's largest span)
keep every token, the others one shared elastic window `beta * N` + sinks, with `beta` chosen so
that the cache holds d of a dense one at every length; at most two rules per layer. It has seen
retrieval data of the evaluation's kind, so it shows what a plan of that budget can reach, not
what a search finds.

With `--plan`, the report compares the plan's spans with the scores (the share of the top
retrieval heads the plan keeps dense or nearly); with `--profile-dir` (a profile run's
`profiles/*.npz`), it ranks heads by their estimated loss at a half-length window and compares
that ranking with the retrieval scores (with each estimator the profile has the sums for:
'token', 'answer', 'answer-max', 'copy', 'answer-copy', and 'window' at the profiled
window nearest N/2).

Outputs: heads.json, heads.png (scores, the plan's spans), oracle_plan.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from moa_jax.cli import MODEL_HELP, one_line, option, parse_config, run, setup_logging
from moa_jax.corpora import Document, load_corpus
from moa_jax.domains import FRACTION, NON_NEGATIVE, POSITIVE, TEXT, Float, Int, Options, Relation
from moa_jax.errors import ConfigError
from moa_jax.eval.needle import Passkey
from moa_jax.eval.tasks import TaskContext
from moa_jax.files import atomic_write_text
from moa_jax.models.attention import Attention
from moa_jax.models.masked_attention import chunked_attention
from moa_jax.models.registry import load_config, load_model
from moa_jax.plan import Plan, model_metadata
from moa_jax.search.influence_profile import InfluenceProfile

# by its module name: under `python -m` __name__ is '__main__', outside the moa_jax logger
log = logging.getLogger("moa_jax.eval.heads")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("rows", "row_w", "key_mask"),
    meta_fields=("q_chunk",),
)
@dataclasses.dataclass(frozen=True)
class NeedleMassAttention(Attention):
    """Dense causal attention that also returns, per query head, the attention mass the query
    rows `rows` int [B, A] (weights `row_w` [B, A]) put on the keys `key_mask` bool [B, N]:
    its `probe` is mass [B, H]."""

    q_chunk: int = 512
    rows: jax.Array | None = None
    row_w: jax.Array | None = None
    key_mask: jax.Array | None = None

    def __call__(self, q, k, v, *, layer, positions, lengths=None):
        return chunked_attention(q, k, v, positions, q_chunk=self.q_chunk)

    def probe(self, q, k, v, *, layer, positions):
        rows, row_w, key_mask = self.rows, self.row_w, self.key_mask
        b, n, h, d = q.shape
        g = h // k.shape[2]
        qa = jnp.take_along_axis(q, rows[:, :, None, None], axis=1).astype(jnp.float32)
        kk = jnp.repeat(k, g, axis=2).astype(jnp.float32)
        logits = jnp.einsum("bahd,bshd->bhas", qa, kk) * d**-0.5
        causal = jnp.arange(n)[None, None, :] <= rows[:, None, :, None]
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
        mass = jnp.sum(jnp.where(key_mask[:, None, None, :], probs, 0.0), axis=-1)  # [B,H,A]
        mass = (mass * row_w[:, None, :]).sum(-1) / jnp.maximum(row_w.sum(-1), 1.0)[:, None]
        return mass


@functools.partial(jax.jit, static_argnames=("graphdef", "attention"))
def _needle_mass(graphdef, state, tokens, rows, row_w, key_mask, *, attention):
    """Mass [B, L, H] of every layer (`NeedleMassAttention` `attention` given the arrays)."""
    model = nnx.merge(graphdef, state)
    b, n = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    attention = dataclasses.replace(attention, rows=rows, row_w=row_w, key_mask=key_mask)
    _, masses = model.hidden_states(tokens, positions, attention=attention, mode="stateless")
    return jnp.stack(masses, axis=1)


def _find(seq: Sequence[int], sub: Sequence[int]) -> list[int]:
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if list(seq[i : i + n]) == list(sub)]


def needle_scores(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    num_items: int,
    *,
    seed: int = 1000,
    corpus: str = "shakespeare",
    docs: Sequence[Document] | None = None,
    chat: bool = True,
    q_chunk: int = 512,
    progress: bool = True,
) -> dict[int, np.ndarray]:
    """{length: retrieval score float [items, L, H]} on passkey items (see module docstring)
    whose haystacks are book text from `corpus` (`docs`: its documents, already loaded)."""
    task = Passkey()
    ctx = TaskContext(tokenizer, chat=chat, corpus=corpus, docs=docs)
    graphdef, state = nnx.split(model)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    attention = NeedleMassAttention(q_chunk=q_chunk)
    out = {}
    for n in lengths:
        scores = []
        for item in tqdm(
            task.make_items(ctx, n, num_items, seed),
            desc=f"needle mass N={n}",
            disable=not progress,
            leave=False,
        ):
            prompt = ctx.prompt_ids(item.prompt, item.answer_prefix)
            answer = ctx.answer_ids(item.answer_prefix, item.answer)
            ids = prompt + answer
            key_mask = np.zeros((1, n), bool)
            for occ in _find(prompt, answer):  # the passkey's digits in the haystack
                key_mask[0, occ : occ + len(answer)] = True
            if not key_mask.any():
                raise RuntimeError(f"needle digits of item {item.index} not found in its prompt")
            tokens = np.full((1, n), pad, np.int32)
            tokens[0, : len(ids)] = ids
            rows = np.arange(len(prompt) - 1, len(ids) - 1, dtype=np.int32)[None]
            mass = _needle_mass(
                graphdef,
                state,
                jnp.asarray(tokens),
                jnp.asarray(rows),
                jnp.ones(rows.shape, jnp.float32),
                jnp.asarray(key_mask),
                attention=attention,
            )
            scores.append(np.asarray(mass)[0])
        out[int(n)] = np.stack(scores)
    return out


def dense_groups(groups: int, density: float, dense_fraction: float) -> int:
    """How many of `groups` KV groups the oracle plan keeps dense: `dense_fraction` of them,
    rounded; ValueError when they alone pass the KV-cache density or leave no group sparse."""
    n_dense = int(round(dense_fraction * groups))
    if not 0 < density <= 1 or n_dense >= groups or n_dense / groups > density:
        raise ValueError(
            f"dense fraction {dense_fraction} ({n_dense} of {groups} KV groups dense) does not "
            f"fit density {density}"
        )
    return n_dense


def oracle_plan(
    scores: np.ndarray,
    num_kv_heads: int,
    density: float,
    *,
    dense_fraction: float = 0.25,
    sink: int = 64,
) -> Plan:
    """The oracle plan at KV-cache density `density` (module docstring).

    scores: float [L, H] per query head. The top `dense_fraction` of the L x Hkv KV groups (by
    their heads' maximum score) keep everything; the rest share span `beta * N` with
    beta = (density - f) / (1 - f), f the dense groups' share.
    """
    layers, heads = scores.shape
    group = heads // num_kv_heads
    g = scores.reshape(layers, num_kv_heads, group).max(-1)
    n_dense = dense_groups(g.size, density, dense_fraction)
    dense = np.zeros(g.size, bool)
    dense[np.argsort(-g.reshape(-1), kind="stable")[:n_dense]] = True
    dense = dense.reshape(layers, num_kv_heads)
    f = n_dense / g.size
    beta = (density - f) / (1 - f)
    head_dense = np.repeat(dense, group, axis=1)
    return Plan(
        alphas=np.zeros((layers, heads)).tolist(),
        betas=np.where(head_dense, 1.0, beta).tolist(),
        sinks=sink,
        metadata={
            "source": "moa_jax.eval.heads oracle",
            "kv_cache_density": density,
            "dense_kv_groups": int(n_dense),
            "beta": beta,
        },
    )


def _rank_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Share of a's top-k entries among b's top-k."""
    ta = set(np.argsort(-a.reshape(-1))[:k].tolist())
    tb = set(np.argsort(-b.reshape(-1))[:k].tolist())
    return len(ta & tb) / k


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.reshape(-1)))
    rb = np.argsort(np.argsort(b.reshape(-1)))
    return float(np.corrcoef(ra, rb)[0, 1])


def compare(
    scores: np.ndarray, plan: Plan | None, profiles: dict[int, Any], n: int, top: int
) -> dict[str, Any]:
    """How the plan's spans and the influence ranking relate to the retrieval scores [L, H]."""
    rep: dict[str, Any] = {}
    order = np.argsort(-scores.reshape(-1))[:top]
    heads = [divmod(int(i), scores.shape[1]) for i in order]
    rep["top_heads"] = [{"layer": l, "head": h, "score": float(scores[l, h])} for l, h in heads]
    if plan is not None:
        kept = plan.kept_kv(n) / n
        rep["plan_kept_at_top"] = [float(kept[l, h]) for l, h in heads]
        rep["plan_top_kept_ge_0.9"] = float(np.mean([kept[l, h] >= 0.9 for l, h in heads]))
        rep["plan_mean_kept"] = float(kept.mean())
    for pn, prof in sorted(profiles.items()):
        ests = {}
        if prof.token:
            ests["token"] = prof.window_losses(np.array([pn // 2]))[..., 0]  # [L, H]
        if prof.answer is not None:
            ests["answer"] = prof.window_losses(np.array([pn // 2]), "answer")[..., 0]
        if prof.answer_max is not None:
            ests["answer-max"] = prof.window_losses(np.array([pn // 2]), "answer-max")[..., 0]
        if prof.copy is not None:
            for name in ("copy", "answer-copy"):
                ests[name] = prof.window_losses(np.array([pn // 2]), name)[..., 0]
        if len(prof.windows):
            w = int(prof.windows[np.argmin(np.abs(prof.windows - pn // 2))])
            ests["window"] = prof.window_losses(np.array([w]), "window")[..., 0]
        for name, est in ests.items():
            rep[f"influence_N{pn}_{name}"] = {
                "spearman": _spearman(est, scores),
                f"top{top}_overlap": _rank_overlap(est, scores, top),
            }
    return rep


def _plot(out: Path, scores: dict[int, np.ndarray], plan: Plan | None, n: int) -> str:
    # Imported here: matplotlib takes about a second to load and only the figure needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"needle mass, N={k}", v.mean(0)) for k, v in sorted(scores.items())]
    if plan is not None:
        panels.append((f"plan: kept KV / N at N={n}", plan.kept_kv(n) / n))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 6), squeeze=False)
    for ax, (title, m) in zip(axes[0], panels):
        im = ax.imshow(
            m,
            aspect="auto",
            cmap="magma" if "mass" in title else "viridis",
            vmin=0,
            vmax=max(float(m.max()), 1e-6) if "mass" in title else 1,
        )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(out / "heads.png", dpi=120)
    plt.close(fig)
    return "heads.png"


DEFAULTS: dict[str, Any] = {
    "lengths": [2048, 4096, 8192],
    "num_items": 20,
    "seed": 1000,
    "corpus": "shakespeare",
}
"""The options of the measurement (unset: these values); an earlier run's scores (--scores)
come with their own, so none of them goes with --scores."""


@dataclasses.dataclass(frozen=True)
class HeadsConfig(Options):
    """`python -m moa_jax.eval.heads`: the flags (and YAML keys) of the command."""

    model: str = option("smollm2-135m", MODEL_HELP, TEXT)
    lengths: list[int] | None = option(
        None,
        "passkey item lengths (default 2048 4096 8192)",
        Int(64, distinct=True, min_items=1),
        nargs="+",
    )
    num_items: int | None = option(None, "passkey items per length (default 20)", POSITIVE)
    seed: int | None = option(
        None, "item seed (default 1000, apart from the evaluation's seed, 0)", NON_NEGATIVE
    )
    corpus: str | None = option(None, "haystack text (default shakespeare)", TEXT)
    density: float = option(0.5, "oracle plan's KV-cache density", FRACTION)
    dense_fraction: float = option(
        0.25, "share of KV groups the oracle keeps dense", Float(0.0, 1.0, hi_open=True)
    )
    sink: int = option(64, "sink tokens of the oracle plan", NON_NEGATIVE)
    plan: str | None = option(None, "a plan to compare with the scores", TEXT)
    profile_dir: str | None = option(None, "profile .npz files to compare", TEXT)
    scores: str | None = option(
        None, "reuse the scores of an earlier run's heads.json instead of measuring", TEXT
    )
    top: int | None = option(
        None,
        "top heads compared, at most the model's layers x heads (default: 20, or all of a "
        "smaller model's)",
        POSITIVE,
    )
    out: str = option("heads", "output directory", TEXT)
    progress: bool = option(True, "show progress bars")

    relations: ClassVar[tuple[Relation, ...]] = (
        Relation(
            ("scores", *DEFAULTS),
            lambda c: c.scores is None or all(getattr(c, k) is None for k in DEFAULTS),
            "--lengths, --num-items, --seed and --corpus set up a measurement: not with "
            "--scores (its file holds the lengths, items and seed it was measured with)",
        ),
    )

    def __post_init__(self) -> None:
        if self.scores is None:
            for key, value in DEFAULTS.items():
                if getattr(self, key) is None:
                    object.__setattr__(self, key, list(value) if isinstance(value, list) else value)
        super().__post_init__()


def _read_profiles(directory: str, shape: tuple[int, int]) -> dict[int, InfluenceProfile]:
    """{length: profile} of a profile run's .npz files, each of the model's [layers, heads]."""
    path = Path(directory)
    files = sorted(path.glob("*.npz")) if path.is_dir() else []
    if not files:
        raise ConfigError(f"--profile-dir {directory}: no such directory, or no .npz files in it")
    profiles = {}
    for f in files:
        try:
            prof = InfluenceProfile.load(f)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--profile-dir: {f} is not an influence profile ({e})") from None
        if prof.heads_shape != shape:
            raise ConfigError(
                f"--profile-dir: {f} profiles {prof.heads_shape[0]} layers x "
                f"{prof.heads_shape[1]} heads, the model has {shape[0]} x {shape[1]}"
            )
        profiles[prof.length] = prof
    return profiles


def _read_scores(path: str, shape: tuple[int, int]) -> tuple[dict[int, np.ndarray], int, int]:
    """(scores {length: [1, L, H]}, items, seed) of an earlier run's heads.json."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--scores {path}: {one_line(e)}") from None
    keys = ("scores", "num_items", "seed")
    if not isinstance(earlier, dict) or not set(keys) <= set(earlier):
        raise ConfigError(f"--scores {path}: not a heads.json (it needs {', '.join(keys)})")
    try:
        scores = {int(k): np.asarray(v, np.float64)[None] for k, v in earlier["scores"].items()}
        num_items, seed = int(earlier["num_items"]), int(earlier["seed"])
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--scores {path}: malformed heads.json ({one_line(e)})") from None
    bad = [n for n, v in scores.items() if v.shape[1:] != shape]
    if not scores or bad:
        raise ConfigError(
            f"--scores {path}: no scores of the model's {shape[0]} layers x {shape[1]} heads"
            + (f" at length {bad[0]}" if bad else "")
        )
    return scores, num_items, seed


def main(argv: Sequence[str] | None = None) -> int:
    prog = "python -m moa_jax.eval.heads"
    cfg = parse_config(HeadsConfig, argv, prog=prog, description=__doc__)
    setup_logging()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a directory")
    # what needs no model run first: the plan, the profiles, the scores against the config
    mc = load_config(cfg.model)
    shape = (mc.num_layers, mc.num_heads)
    plan = None
    if cfg.plan:
        plan = Plan.load(cfg.plan, mc.num_layers, mc.num_heads).validate(mc)
    try:
        dense_groups(mc.num_layers * mc.num_kv_heads, cfg.density, cfg.dense_fraction)
    except ValueError as e:
        raise ConfigError(f"--dense-fraction, --density: {e}") from None
    top = min(20, mc.num_layers * mc.num_heads) if cfg.top is None else cfg.top
    if top > mc.num_layers * mc.num_heads:
        raise ConfigError(
            f"--top {top} is more than the model's {mc.num_layers * mc.num_heads} heads"
        )
    profiles = _read_profiles(cfg.profile_dir, shape) if cfg.profile_dir else {}
    if cfg.scores:
        scores, num_items, seed = _read_scores(cfg.scores, shape)
        lengths = sorted(scores)
    else:
        lengths, num_items, seed = cfg.lengths, cfg.num_items, cfg.seed
        too_long = [n for n in lengths if n > mc.max_position_embeddings]
        if too_long:
            log.warning(
                f"lengths {too_long} exceed the model's context ({mc.max_position_embeddings})"
            )
        docs = load_corpus(cfg.corpus)
        model, tok = load_model(cfg.model)
        if tok is None:
            raise ConfigError(f"model {cfg.model!r} has no tokenizer; the passkey items need one")
        scores = needle_scores(
            model,
            tok,
            lengths,
            num_items,
            seed=seed,
            corpus=cfg.corpus,
            docs=docs,
            progress=cfg.progress,
        )
    mean = np.mean([s.mean(0) for s in scores.values()], axis=0)  # [L, H]
    oracle = oracle_plan(
        mean,
        mc.num_kv_heads,
        cfg.density,
        dense_fraction=cfg.dense_fraction,
        sink=cfg.sink,
    )
    oracle = dataclasses.replace(
        oracle, metadata={**oracle.metadata, "model": cfg.model, **model_metadata(mc)}
    )
    out.mkdir(parents=True, exist_ok=True)
    oracle.save(out / "oracle_plan.json")
    n = max(lengths)
    report = {
        "lengths": lengths,
        "num_items": num_items,
        "seed": seed,
        "scores": {str(k): v.mean(0).tolist() for k, v in scores.items()},
        "compare": compare(mean, plan, profiles, n, top),
        "oracle": {
            "density": cfg.density,
            "dense_fraction": cfg.dense_fraction,
            "kv_cache_density": {
                str(k): oracle.kv_cache_density(k, mc.num_kv_heads) for k in lengths
            },
        },
        "figure": _plot(out, scores, plan, n),
    }
    atomic_write_text(out / "heads.json", json.dumps(report, indent=1) + "\n")
    c = report["compare"]
    print(
        "top retrieval heads (layer, head, score):",
        ", ".join(f"L{h['layer']}H{h['head']} {h['score']:.2f}" for h in c["top_heads"][:10]),
    )
    for k, v in c.items():
        if k != "top_heads" and not isinstance(v, list):
            print(f"  {k}: {v}")
    log.info("wrote %s, %s, %s", out / "heads.json", out / "heads.png", out / "oracle_plan.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
