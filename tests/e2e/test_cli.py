"""The `idealrt` CLI end to end: each call starts the embedded suite (real gRPC servers on
loopback, SQLite under --data-dir), so successive commands share one store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from idealrt.clients.cli import main

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class Cli:
    def __init__(self, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.data_dir = data_dir
        self.capsys = capsys

    def run(self, *args: str, expect: int = 0) -> Any:
        self.capsys.readouterr()
        rc = main([*args, "--data-dir", str(self.data_dir), "--json"])
        out = self.capsys.readouterr()
        assert rc == expect, out.err[-3000:]
        assert '"event": "audit"' not in out.err  # audit lines go to <data dir>/audit.log
        return json.loads(out.out) if expect == 0 and out.out.strip() else out


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The CLI's embedded suite profiles unpinned on a shared machine, where other load says
    nothing about what these tests check: contention checks are off (see tests/conftest.py
    `suite`; contention detection has tests of its own with injected contention)."""
    monkeypatch.setenv("IDEALRT_CONTENTION_MONITORS", "0")
    monkeypatch.setenv("IDEALRT_CONTENTION_CHECKS", "0")
    return Cli(tmp_path / "data", capsys)


def _write_csv(
    path: Path,
    beta0: float,
    beta1: float,
    alpha: dict[int, float],
    outputs: tuple[int, ...],
    noise: float = 0.0,
    seed: int = 0,
    heldout: tuple[int, ...] = (),
) -> None:
    """Samples of a known cost model in the import-samples CSV format."""
    rng = np.random.default_rng(seed)
    lines = ["prompt_tokens,output_tokens,prefill_ns,decode_ns,heldout"]
    for p, a in alpha.items():
        for o in outputs:
            for _ in range(3):
                steps = [
                    int((beta0 + beta1 * (p + i)) * 1e9 * (1 + noise * rng.random()))
                    for i in range(1, o)
                ]
                lines.append(
                    f"{p},{o},{int(a * 1e9)},{';'.join(map(str, steps))},{int(p in heldout)}"
                )
    path.write_text("\n".join(lines) + "\n")


def test_models_lists_the_catalog(cli: Cli) -> None:
    rows = cli.run("models")
    by_name = {r["name"]: r for r in rows}
    assert by_name["gpt2"]["params"] == pytest.approx(124.4e6, rel=0.005)
    assert by_name["llama-2-7b"]["kv_heads"] == 32


def test_profile_fit_estimate_watch_and_list(cli: Cli, tmp_path: Path) -> None:
    prof = cli.run(
        "profile",
        "--model",
        "tiny-gpt2",
        "--prompt-tokens",
        "1,16,32",
        "--output-tokens",
        "1,4",
        "--repeats",
        "2",
        "--holdout-prompt-tokens",
        "8",
    )
    assert prof["state"] == "succeeded"
    pid = prof["id"]
    # the embedded suite's audit trail is under the data dir, not on the user's terminal
    audited = [json.loads(x) for x in (cli.data_dir / "audit.log").read_text().splitlines()]
    assert {"CreateProfile", "AppendSamples"} <= {a["rpc"].rsplit("/", 1)[-1] for a in audited}
    cm = cli.run("fit", "--profile", pid, "--bootstrap", "20")
    assert cm["profile_id"] == pid and cm["quality"]["method"] == "heldout"
    one = cli.run(
        "estimate", "--cost-model", cm["id"], "--prompt-tokens", "16", "--output-tokens", "4"
    )
    assert one["summary"]["count"] == 1
    assert one["queries"][0]["runtime_s"] > 0
    q = tmp_path / "w.jsonl"
    q.write_text(
        "\n".join(
            json.dumps({"prompt_tokens": p, "output_tokens": o})
            for p, o in [(1, 1), (16, 4), (32, 4)]
        )
    )
    many = cli.run("estimate", "--cost-model", cm["id"], "--queries", str(q))
    assert many["summary"]["count"] == 3
    assert many["summary"]["sum_s"] == pytest.approx(sum(x["runtime_s"] for x in many["queries"]))
    watched = cli.run("watch", pid)
    assert watched["state"] == "succeeded"
    listed = cli.run("profiles")
    assert pid in {p["id"] for p in listed["profiles"]}
    cancelled = cli.run("cancel", pid, expect=2)  # terminal: FAILED_PRECONDITION
    assert "FAILED_PRECONDITION" in cancelled.err


def test_economical_profile_fits_with_kfold_error(cli: Cli) -> None:
    prof = cli.run(
        "profile",
        "--model",
        "tiny-gpt2",
        "--economical",
        "--prompt-tokens",
        "1,48",
        "--output-tokens",
        "1,6",
    )
    assert prof["state"] == "succeeded"
    plan = prof["plan"]
    assert plan["prompt_tokens"] == [1, 6, 16, 19, 34, 48]
    assert plan["output_tokens"] == [1, 6]
    assert (plan["repeats"], plan["warmups"]) == (1, 0)
    cm = cli.run("fit", "--profile", prof["id"], "--bootstrap", "20")
    assert cm["quality"]["method"] == "kfold"
    assert cm["valid_output_tokens"] == [1, 6]


def test_import_samples_recovers_a_known_curve(cli: Cli, tmp_path: Path) -> None:
    csv = tmp_path / "known.csv"
    alpha = {1: 0.02, 64: 0.02, 256: 0.06, 512: 0.11, 128: 0.02 + 0.04 / 3}  # piecewise linear
    _write_csv(csv, beta0=0.01, beta1=2e-6, alpha=alpha, outputs=(1, 8, 32), heldout=(128,))
    imported = cli.run("import-samples", str(csv), "--name", "known")
    cm = cli.run("fit", "--profile", imported["profile_id"], "--bootstrap", "0")
    assert cm["beta0_s"] == pytest.approx(0.01, rel=1e-3)
    assert cm["beta1_s"] == pytest.approx(2e-6, rel=1e-2)
    assert cm["quality"]["points"] > 0 and cm["quality"]["max_rel"] < 0.01
    assert 128 not in cm["alpha_knots_p"]  # held out, never used


def test_import_samples_rejects_bad_rows_and_stores_nothing(cli: Cli, tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("prompt_tokens,output_tokens,prefill_ns,decode_ns\n4,3,100,5;6\n0,1,100,\n")
    out = cli.run("import-samples", str(csv), expect=2)
    assert "CSV_VALUE_INVALID" in out.err and "line 3" in out.err
    assert cli.run("profiles")["profiles"] == []


def test_denoise_compare_cost_roofline_pareto(cli: Cli, tmp_path: Path) -> None:
    a_csv, b_csv = tmp_path / "a.csv", tmp_path / "b.csv"
    alpha = {1: 0.02, 128: 0.04, 512: 0.12}
    _write_csv(a_csv, 0.010, 0.0, alpha, (1, 8, 32), noise=0.02, seed=1)
    _write_csv(
        b_csv, 0.013, 0.0, {k: v * 1.3 for k, v in alpha.items()}, (1, 8, 32), noise=0.02, seed=2
    )
    a = cli.run("import-samples", str(a_csv), "--name", "a")["profile_id"]
    b = cli.run("import-samples", str(b_csv), "--name", "b")["profile_id"]
    cmp_ = cli.run(
        "compare",
        "--a",
        a,
        "--b",
        b,
        "--prompt-tokens",
        "100",
        "--output-tokens",
        "20",
        "--bootstrap",
        "40",
    )
    assert cmp_["ratio"] < 1 and cmp_["significant"]
    den_min = cli.run("denoise", "--profile", a, "--method", "min")
    den_q = cli.run("denoise", "--profile", a, "--method", "quantile")
    for d in (den_min, den_q):
        assert d["kind"] == "denoised"
        assert d["beta0_s"] == pytest.approx(0.010, rel=0.05)
    cm = cli.run("fit", "--profile", a, "--bootstrap", "0")
    cost = cli.run(
        "cost",
        "--cost-model",
        cm["id"],
        "--model",
        "davinci",
        "--accelerator",
        "A100-80GB",
        "--prompt-tokens",
        "100",
        "--output-tokens",
        "20",
    )
    assert cost["accelerators"] == 8 and cost["dollars"] > 0 and cost["energy_source"] == "tdp"
    roof = cli.run("roofline", "--model", "gpt2", "--cost-model", cm["id"])
    assert roof["decode"] and all(x["lower_bound_s"] > 0 for x in roof["decode"])
    acc = tmp_path / "acc.csv"
    acc.write_text("model,accuracy\na,0.6\nb,0.7\n")
    cm_b = cli.run("fit", "--profile", b, "--bootstrap", "0")
    png = tmp_path / "pareto.png"
    par = cli.run(
        "pareto",
        "--accuracies",
        str(acc),
        "--cost-model",
        f"a={cm['id']}",
        "--cost-model",
        f"b={cm_b['id']}",
        "--prompt-tokens",
        "100",
        "--output-tokens",
        "20",
        "--plot",
        str(png),
    )
    assert {r["model"] for r in par["rows"] if r["on_frontier"]} == {"a", "b"}
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(not SHARED.exists(), reason="shared/data not beside the checkout")
def test_helm_import_export_round_trip(cli: Cli, tmp_path: Path) -> None:
    src = SHARED / "helm_inference_idealized_runtimes_sample.json"
    cms = cli.run("import-helm", str(src))
    doc = json.loads(src.read_text())
    assert {c["name"] for c in cms} == set(doc)
    out = tmp_path / "out.json"
    args = [a for c in cms for a in ("--cost-model", f"{c['name']}={c['id']}")]
    cli.run("export-helm", *args, "--output", str(out))
    back = json.loads(out.read_text())
    for name, entry in doc.items():
        assert back[name]["runtime_per_output_token"] == pytest.approx(
            entry["runtime_per_output_token"]
        )
        for k, v in entry["runtime_for_prompt_tokens"].items():
            assert back[name]["runtime_for_prompt_tokens"][k] == pytest.approx(v)


def test_bad_input_exits_2_naming_the_field(cli: Cli) -> None:
    out = cli.run(
        "profile", "--model", "tiny-gpt2", "--prompt-tokens", "0", "--output-tokens", "1", expect=2
    )
    assert "INVALID_ARGUMENT" in out.err and "plan.prompt_tokens" in out.err
    out = cli.run(
        "profile", "--model", "nope", "--prompt-tokens", "1", "--output-tokens", "1", expect=2
    )
    assert "UNKNOWN_MODEL" in out.err
    out = cli.run("fit", "--profile", "prof_000000000000", expect=2)
    assert "NOT_FOUND" in out.err
