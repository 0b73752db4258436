"""The graph benchmark's machinery at a tiny size (no timing is asserted):
each measurement comes back from its own subprocess, and both tools, given
the same files, build the same graph (circuit-tracer's counts are its own,
computed in its environment)."""

import csv

import pytest
from circuit_tracer_env import circuit_tracer_python

from interpkernels.benchmarks import graphs

pytest.importorskip("transformer_lens")

TINY = ["--layers", "2", "--d-model", "32", "--latents", "64", "--active", "4", "--time-limit", "300"]


def test_interpkernels_alone_writes_csv_and_plot(tmp_path):
    rows = graphs.main(["--tokens", "12", "8", "--tools", "interpkernels", *TINY,
                        "--csv", str(tmp_path / "graphs.csv"), "--plot", str(tmp_path / "graphs.png")])
    assert [(row["tool"], row["tokens"], row["status"]) for row in rows] == [
        ("interpkernels", 8, "ok"), ("interpkernels", 12, "ok")]
    for row in rows:
        # 2 layers x ~4 active latents x (tokens - 1) positions (BOS has none); a subprocess holds torch.
        assert 2 * (row["tokens"] - 1) <= row["features"] <= 16 * (row["tokens"] - 1)
        assert row["edges"] > row["features"] and 0 < row["pruned_nodes"] and 0.1 < row["peak_rss_gib"] < 4
    with open(tmp_path / "graphs.csv") as f:
        written = list(csv.DictReader(f))
    assert [(row["tool"], row["tokens"], row["features"]) for row in written] == [
        ("interpkernels", str(row["tokens"]), str(row["features"])) for row in rows]
    assert (tmp_path / "graphs.png").stat().st_size > 0


def test_both_tools_build_the_same_graph(tmp_path):
    rows = graphs.main(["--tokens", "8", "12", *TINY, "--circuit-tracer-max-tokens", "8",
                        "--circuit-tracer-python", str(circuit_tracer_python()), "--csv", str(tmp_path / "g.csv")])
    by_key = {(row["tool"], row["tokens"]): row for row in rows}
    ours, theirs = by_key["interpkernels", 8], by_key["circuit-tracer", 8]
    assert ours["status"] == theirs["status"] == "ok"
    for size in ("features", "edges", "pruned_nodes", "pruned_edges"):
        assert ours[size] == theirs[size], size
    assert by_key["circuit-tracer", 12]["status"] == "not run: past --circuit-tracer-max-tokens 8"
    assert by_key["interpkernels", 12]["status"] == "ok"


def test_max_feature_nodes_and_edge_mass_reach_the_graph(tmp_path):
    rows = graphs.main(["--tokens", "12", "--tools", "interpkernels", *TINY, "--max-feature-nodes", "10",
                        "--edge-mass", "0.5", "--csv", str(tmp_path / "graphs.csv")])
    exact = graphs.main(["--tokens", "12", "--tools", "interpkernels", *TINY, "--max-feature-nodes", "10",
                         "--csv", str(tmp_path / "exact.csv")])
    assert rows[0]["status"] == exact[0]["status"] == "ok"
    assert rows[0]["rows"] == exact[0]["rows"] == 10 < rows[0]["features"] == exact[0]["features"]
    assert (rows[0]["max_feature_nodes"], rows[0]["edge_mass"], exact[0]["edge_mass"]) == (10, 0.5, 1.0)
    assert 0 < rows[0]["edges"] < exact[0]["edges"]


def test_a_run_past_its_time_limit_is_stopped_and_still_reports_its_peak(tmp_path):
    # One second does not reach the graph (importing torch alone takes longer here).
    rows = graphs.main(["--tokens", "8", "--tools", "interpkernels", *TINY, "--time-limit", "1",
                        "--csv", str(tmp_path / "graphs.csv")])
    assert rows[0]["status"] == "over the 1 s limit"
    assert 0 < rows[0]["peak_rss_gib"] < 4 and "total_s" not in rows[0]
