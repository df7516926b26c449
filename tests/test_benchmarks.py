"""Benchmark scripts run end to end in --quick mode and write their JSON."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_accuracy_vs_cost_quick(tmp_path, capsys):
    result = load("accuracy_vs_cost").main(["--quick", "--out", str(tmp_path)])
    rows = {r["row"]: r for r in result["table"]}
    assert set(rows) == {"dense", "sparse", "spfde-20+20"}
    assert rows["sparse"]["flops_vs_sparse"] == 1.0
    assert rows["dense"]["train_flops"] > rows["sparse"]["train_flops"] > rows["spfde-20+20"]["train_flops"]
    assert rows["spfde-20+20"]["sieve_reduction"] == pytest.approx(0.2, abs=0.02)
    assert json.loads((tmp_path / "results.json").read_text())["table"] == result["table"]
    assert "spfde-20+20" in capsys.readouterr().out
