"""Quality evaluation of attention methods: `python -m moa_jax.eval`.

Tasks (each generated from a seed, no model hub; see the modules):
  retrieval     LongEval-style key-value lines (`retrieval.py`)
  needle        passkey in real book text, depth x length grid (`needle.py`)
  mk_needle, mv_needle, var_track, common_words   RULER-style (`ruler.py`), group 'ruler'
  perplexity    last-token perplexity of long book windows (`perplexity.py`)
Methods (`moa_jax.methods`, the registry every command builds its attention from): dense,
moa (--plan), uniform (window + sinks at matched KV density), and the decode-time methods
recycled (Recycled Attention), streaming (StreamingLLM) and h2o.

Public API:
  TASKS, GROUPS, resolve_tasks, Item, TaskContext      tasks.py
  Runner                                               runner.py
  summarize, pivot_table, detail_table                 report.py
"""

from moa_jax.eval.needle import Passkey
from moa_jax.eval.perplexity import TailPerplexity
from moa_jax.eval.retrieval import LineRetrieval
from moa_jax.eval.ruler import CommonWords, MultiKeyNeedle, MultiValueNeedle, VariableTracking
from moa_jax.eval.tasks import GROUPS, TASKS, Item, Task, TaskContext, register_task, resolve_tasks

for _task in (
    LineRetrieval(),
    Passkey(),
    MultiKeyNeedle(),
    MultiValueNeedle(),
    VariableTracking(),
    CommonWords(),
    TailPerplexity(),
):
    if _task.name not in TASKS:
        register_task(_task)
GROUPS.setdefault("ruler", ("mk_needle", "mv_needle", "var_track", "common_words"))

# After the built-in tasks are registered (the runner resolves task names at import).
from moa_jax.eval.report import detail_table, pivot_table, summarize  # noqa: E402
from moa_jax.eval.runner import Runner  # noqa: E402

__all__ = [
    "TASKS",
    "GROUPS",
    "resolve_tasks",
    "register_task",
    "Item",
    "Task",
    "TaskContext",
    "Runner",
    "summarize",
    "pivot_table",
    "detail_table",
]
