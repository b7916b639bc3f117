"""benchmarks/bench_disa_mar.py runs end to end (toy widths) and writes the fields it declares."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_disa_mar.py"


def test_bench_disa_mar_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_disa_mar", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "disa_mar_b_cpu.json"
    payload = mod.main(["--smoke", "--device", "cpu", "--ar-steps", "3", "--repeats", "2", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert set(rec) - {"provenance"} == set(mod.RESULT_FIELDS["disa_mar_b_cpu.json"])
    assert set(payload["arms"]) == {"disa", "full50", "full100"}
    assert payload["arms"]["disa"]["wall_s"]["n"] == 2
    # exact counts: the run's counters equal the closed-form budget (x2 rows under CFG)
    from gensample.samplers.disa import StepBudgetSchedule, head_budget

    calls, rows = head_budget(StepBudgetSchedule("linear", 50, 5), 256, 3, timestep_clip=950)
    assert payload["arms"]["disa"]["head_calls"] == calls and payload["arms"]["disa"]["head_rows"] == 2 * rows
    assert payload["ratios"]["full100/disa"]["head_calls"] > 3
