"""`python -m moa_jax.bench.scaling`: one process per (part, device count), forced CPU devices;
rows, scaling efficiency, and a failing part recorded instead of stopping the run."""

import json

import pytest

from moa_jax.bench import scaling
from moa_jax.cli import run

from test_bad_input import _one_line_error


def test_efficiency_and_table_from_rows():
    rows = [
        dict(
            part="train",
            devices=1,
            status="ok",
            tokens_per_s_per_device=100.0,
            tokens_per_s=100.0,
            mesh={"data": 1, "fsdp": 1, "tensor": 1},
        ),
        dict(
            part="train",
            devices=4,
            status="ok",
            tokens_per_s_per_device=90.0,
            tokens_per_s=360.0,
            mesh={"data": 1, "fsdp": 4, "tensor": 1},
        ),
        dict(part="profile", devices=2, status="ok", items_per_s=1.0, seconds_per_item=1.0),
        dict(part="profile", devices=4, status="ok", items_per_s=1.5, seconds_per_item=0.67),
        dict(part="train", devices=8, status="oom"),
    ]
    scaling.efficiency(rows, "train", "tokens_per_s_per_device", True)
    scaling.efficiency(rows, "profile", "items_per_s", False)
    assert rows[0]["scaling_efficiency"] == 1.0
    assert rows[1]["scaling_efficiency"] == pytest.approx(0.9)
    # profile: the smallest count that ran (2) is the baseline; 4 devices at 1.5x = 0.75.
    assert rows[3]["scaling_efficiency"] == pytest.approx(0.75)
    assert rows[3]["efficiency_baseline_devices"] == 2
    assert "scaling_efficiency" not in rows[4]
    table = scaling.format_table(rows)
    assert "| train | 4 | 1,4,1 | 360 tok/s | 90 |" in table and "| oom |" in table


# One process per (part, device count, layout), each importing jax and compiling its model
# (~10 s on a CPU core): the default run measures 2 devices on the tensor layout (3 processes),
# -m slow 1 and 2 devices on both layouts (7).
@pytest.mark.parametrize(
    "devices, layouts",
    [
        pytest.param([2], ["tensor"], id="2-tensor"),
        pytest.param([1, 2], ["data", "tensor"], id="1,2-data,tensor", marks=pytest.mark.slow),
    ],
)
def test_tiny_run_on_forced_devices(tmp_path, capsys, devices, layouts):
    out = tmp_path / "scaling.json"
    assert (
        scaling.main(
            [
                "--tiny",
                "--devices",
                *map(str, devices),
                "--parts",
                "train",
                "profile",
                "decode",
                "--layouts",
                *layouts,
                "--decode-batches",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads(out.read_text())
    rows = rep["rows"]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    train = {r["devices"]: r for r in rows if r["part"] == "train"}
    assert set(train) == set(devices)
    assert train[2]["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and train[2]["rows"] == 2
    assert train[devices[0]]["scaling_efficiency"] == 1.0 and train[2]["scaling_efficiency"] > 0
    for r in train.values():
        assert r["tokens_per_s"] > 0 and r["seq_len"] == 64 + 8
    prof = {r["devices"]: r for r in rows if r["part"] == "profile"}
    assert prof[2]["items"] == 2 * 2 and prof[2]["seconds_per_item"] > 0
    dec = [r for r in rows if r["part"] == "decode"]
    runs = [(1, "data")] if 1 in devices else []  # one device: one mesh
    runs += [(2, layout) for layout in layouts]
    assert sorted((r["devices"], r["layout"], r["variant"]) for r in dec) == sorted(
        (n, layout, v) for n, layout in runs for v in ("dense-kernel", "moa het:0.5")
    )
    for r in dec:
        axis = "data" if r["layout"] == "data" else "tensor"
        assert r["mesh"][axis] == r["devices"] and r["tokens_per_s"] > 0
    assert rep["device"] == "cpu"
    assert "| decode | 2 | 1,1,2 |" in capsys.readouterr().out


def test_a_failing_part_is_a_row_not_a_crash(tmp_path):
    # A process that cannot finish in time (1 s) is recorded, and the next one still runs.
    out = tmp_path / "s.json"
    assert (
        scaling.main(
            [
                "--tiny",
                "--devices",
                "1",
                "2",
                "--parts",
                "train",
                "--timeout",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["devices"] for r in rows] == [1, 2]
    assert all(r["status"] == "error" and "timed out" in r["error"] for r in rows)


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["--devices", "0"], ["--devices", ">= 1"]),
        (["--devices", "2", "2"], ["--devices", "differ"]),
        (["--parts", "infer"], ["--parts", "infer"]),
        (["--layouts"], ["--layouts"]),
        (["--prefix", "0"], ["--prefix"]),
        (["--top-k", "100", "--prefix", "64"], ["--top-k", "--prefix"]),
        (["--top-k", "100"], ["--top-k", "--prefix"]),  # --tiny's prefix is 64
        (["--answer-tokens", "128", "--profile-length", "128"], ["--answer-tokens"]),
        (["--train-steps", "0"], ["--train-steps"]),
        (["--decode-context", "0"], ["--decode-context"]),
        (["--decode-batches", "0"], ["--decode-batches", "'max'"]),
        (["--decode-batches", "max", "max"], ["--decode-batches", "differ"]),
        (["--moa-density", "0.3"], ["--moa-density", "0.5, 0.25"]),
        (["--timeout", "0"], ["--timeout", "> 0"]),
        (["--worker", "train"], ["--worker", "--worker-out"]),
    ],
)
def test_bad_options_are_refused_before_any_process(argv, needles, tmp_path, capsys):
    """A value the parts could not run with is one error line, not a report of failed rows."""
    out = tmp_path / "s.json"
    code = run(scaling.main, ["--tiny", *argv, "--out", str(out)])
    _one_line_error(capsys, code, 2, *needles)
    assert not out.exists()


def test_values_given_are_kept_and_defaults_filled():
    given = scaling.ScalingConfig(tiny=True, prefix=32, top_k=8, decode_batches=[1]).resolved()
    assert (given.prefix, given.top_k, given.tail, given.decode_batches) == (32, 8, 8, [1])
    full = scaling.ScalingConfig().resolved()
    assert (full.prefix, full.top_k, full.profile_length, full.decode_batches) == (
        8192,
        2048,
        8192,
        [1, "max"],
    )
