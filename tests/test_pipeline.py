"""pipeline.py on the tiny preset, shortened (one optimizer step per stage, short evals): every stage trained and
evaluated in order, the report card's numbers taken from the runs, and a rerun that trains and evaluates nothing."""
import json
import re

import pytest

import pipeline

EVAL_ARGS = "--limit 2 --max-new-tokens 8"
SHORT = ["--max-steps", "1", "--no-samples", "--max-eval-batches", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("CORTEX_PRESET", "tiny")
    try:
        pipeline.main(["--run-dir", str(root), "--eval-args", EVAL_ARGS, "--", *SHORT])
        yield root, mp
    finally:
        mp.undo()


def test_every_stage_is_trained_and_evaluated_and_the_card_shows_the_runs(runs):
    root, _ = runs
    card = (root / "report.md").read_text()
    row = r"^\| (\w+) \| (\d+) \| ([\d.]+) s \| ([\d,]+) \| [^|]+ \| [^|]+ \| ([\d.]+) \|"  # ... eval held-out loss
    rows = {m[0]: m[1:] for m in re.findall(row, card, re.M)}
    assert list(rows) == list(pipeline.STAGE_ORDER)
    for stage, (steps, _, tokens, heldout) in rows.items():
        summary = json.loads((root / stage / "stage.json").read_text())
        report = json.loads((root / stage / "eval" / "report.json").read_text())
        assert int(steps) == summary["steps"] == 1 and int(tokens.replace(",", "")) == summary["tokens_seen"]
        assert heldout == f"{report['loss']['loss']:.3f}"
        assert (root / stage / "plots" / "loss.png").is_file()
        assert ("format" in report) == (not stage.startswith("pretrain"))  # a base model gets loss and routing only
    dpo = json.loads((root / "dpo" / "eval" / "report.json").read_text())
    assert [r["budget"] for r in dpo["budget"]] == [0, None] and dpo["loss"]["stage"] == "mix"
    assert dpo["accuracy"]["samples_per_prompt"] == 4  # the last stage: every section in full
    for stage in ("cot", "grpo", "mix"):  # between stages: greedy only, three budgets
        report = json.loads((root / stage / "eval" / "report.json").read_text())
        assert report["accuracy"]["sampled_pass_at_1"] is None
        assert [r["budget"] for r in report["budget"]] == [0, 16, None]
    assert re.search(r"This pipeline.py run: \d+ s wall, \d+ s CPU", card)
    assert "(dpo/eval/budget_curve.png)" in card and (root / "dpo" / "eval" / "budget_curve.png").is_file()


def test_a_rerun_skips_finished_stages_and_evals(runs, capsys):
    root, _ = runs
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/eval/report.json")}
    assert len(before) == 6
    pipeline.main(["--run-dir", str(root), "--stages", "cot", "mix", "--eval-args", EVAL_ARGS, "--", *SHORT])
    out = capsys.readouterr().out
    assert "cot is complete, not trained again" in out and "mix is complete" in out and "training" not in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/eval/report.json")} == before
    card = (root / "report.md").read_text()
    assert re.findall(r"^\| (\w+) \| \d+ \| [\d.]+ s \|", card, re.M) == ["cot", "mix"]


def test_flags_after_the_separator_go_to_the_stages_and_run_dir_is_the_pipelines(tmp_path):
    args, launcher, script = pipeline.parse_args(["--run-dir", str(tmp_path), "--include", "localhost:0,1", "--",
                                                  "--max-steps", "3"])
    assert launcher == ["--include", "localhost:0,1"] and script == ["--max-steps", "3", "--run-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--", "--run-dir", "x"])
