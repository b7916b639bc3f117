"""benchmarks/bench_mlm_speed.py at tiny size: it runs, writes the declared fields with provenance, and its NFE
and cost model are consistent (no timing is asserted: the numbers depend on the machine)."""

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mlm_speed.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_mlm_speed", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_mlm_speed_tiny_writes_declared_fields(tmp_path):
    bench = _bench()
    out = tmp_path / bench.OUT_FILE
    payload = bench.main(["--tiny", "--repeats", "1", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert set(rec) - {"provenance"} == set(bench.RESULT_FIELDS[bench.OUT_FILE])
    assert rec["provenance"]["machine"]["torch_threads"] == 1 and rec["provenance"]["versions"]["torch"]
    s = payload["settings"]
    budget = s["n_blocks"] * s["steps"]  # LLaDA's schedule: every block makes exactly `steps` calls
    arms = set(bench.STRATEGIES) | set(bench.STOCK)
    for m in bench.SHAPES:
        est, net, samp = payload["estimates"][m], payload["network"][m], payload["sampler"][m]
        assert set(est) == arms and set(samp) == arms
        for k, e in est.items():
            if k == "threshold":  # parallel commits can only save calls
                assert 1 <= e["nfe"] <= budget
            else:
                assert e["nfe"] == budget, (m, k, e["nfe"])
            assert samp[k]["nfe_one_block"] == (s["steps"] if k != "threshold" else samp[k]["nfe_one_block"])
            # the estimate is the declared cost model: NFE x forward + sampler overhead
            assert math.isclose(e["seconds"], e["nfe"] * net["forward_full_s"] + e["sampler_overhead_s"], rel_tol=1e-9)
            assert math.isclose(e["tokens_per_s"], s["gen_length"] * s["batch"] / e["seconds"], rel_tol=1e-9)
            assert e["tokens_per_call"] == s["gen_length"] / e["nfe"]
        shape = payload["shapes"][m]
        assert math.isclose(net["forward_full_s"], shape["n_layers"] * net["layer_full_s"]["median"]
                            + net["head_full_s"]["median"], rel_tol=1e-9)
        assert net["rows_cached"] + net["past_cached"] == s["prompt_length"] + s["gen_length"]
    assert len(payload["load_average"]["per_arm"]) == len(bench.SHAPES) + 1


def test_bench_shapes_are_the_released_configs():
    """LLaDA-8B / Dream-7B config.json values the speed table is scaled with."""
    bench = _bench()
    ll, dr = bench.SHAPES["llada-8b"], bench.SHAPES["dream-7b"]
    assert (ll["d_model"], ll["n_heads"], ll["n_kv_heads"], ll["mlp"], ll["n_layers"], ll["vocab"]) == (4096, 32, 32, 12288, 32, 126464)
    assert (dr["d_model"], dr["n_heads"], dr["n_kv_heads"], dr["mlp"], dr["n_layers"], dr["vocab"]) == (3584, 28, 4, 18944, 28, 152064)
