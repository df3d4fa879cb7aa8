"""The rule-loss estimators of the MoA search, by name (no jax import: the CLIs list them).

Each turns an `InfluenceProfile` into the estimated loss of every rule for every head
(`InfluenceProfile.window_losses` has the formulas); the value is the one-line description the
profile CLI prints.
"""

ESTIMATORS = {
    "token": "sum of dropped |E|",
    "answer": "sum of the answer rows' dropped |E|",
    "answer-max": "largest dropped |E| of the answer rows",
    "copy": "the answer rows' dropped attention on earlier places of their tokens",
    "answer-copy": "the answer rows' dropped |E| plus their dropped copy attention",
    "block": "sum of dropped |E| blocks",
    "window": "first-order loss change",
}
# read from the answer-rows pass alone (`profile_items(token=False)`, the fast path)
ROWS_ONLY_ESTIMATORS = ("answer", "answer-max", "copy", "answer-copy")
# need sums that only the answer-rows pass makes (the every-row pass has the answer sums only)
FAST_PATH_ESTIMATORS = ("answer-max", "copy", "answer-copy")
