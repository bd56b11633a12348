"""scripts/ablation.sh and scripts/heldout_study.sh, the evidence scripts of docs/results.md:
they parse, refuse an unknown configuration with exit 2 before running anything, and every run
directory they compare is one they write (a renamed variant would leave `ama-ray compare` a
missing run); scripts/alpha_phases.py averages the mixtures it is given; scripts/generation_probe.py
judges a finished run's replies."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ablation.sh"
pytestmark = pytest.mark.timeout(60)


def test_ablation_script_parses_and_refuses_an_unknown_configuration(tmp_path):
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    done = subprocess.run(["bash", str(SCRIPT), "tiny"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "AMA": "false"})
    assert done.returncode == 2 and "unknown configuration 'tiny'" in done.stderr
    text = SCRIPT.read_text()
    written = set(re.findall(r"storage\.run_name=\$\{CONFIG\}(_\w+?)\"", text))
    if "storage.run_name=${CONFIG}_spec_${name}_eval" in text:  # one per specialist variant
        written |= {f"_spec_{v}_eval" for v in re.findall(r"\b(half|triple):", text)}
    compared = set(re.findall(r"/\$\{CONFIG\}(_\w+)=", text))
    assert {"_clip_none", "_history", "_history_task_mean", "_spec_half_eval", "_spec_triple_eval"} <= compared
    assert compared <= written, compared - written


def test_heldout_study_script_parses_refuses_and_compares_what_it_writes(tmp_path):
    script = SCRIPT.parent / "heldout_study.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(["bash", str(script), "tiny"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "AMA": "false"})
    assert done.returncode == 2 and "unknown configuration 'tiny'" in done.stderr
    text = script.read_text()
    written = set(re.findall(r"storage\.run_name=\$\{CONFIG\}(_\w+?)\"", text)) | set(re.findall(r"storage\.run_name=(broken_\w+)", text))
    written |= {f"{w}_eval" for w in re.findall(r"evaluate_against_main \"?\$?\{?CONFIG\}?(_\w+?)\"? ", text)}
    written |= {f"{w}_eval" for w in re.findall(r"evaluate_against_main (broken_\w+) ", text)}
    compared = set(re.findall(r"/\$\{CONFIG\}(_\w+)=", text)) | set(re.findall(r"\$ROOT/(broken_\w+)=", text))
    assert {"_signal_eval", "broken_warn_eval", "broken_raw_eval"} <= compared
    assert compared <= written, compared - written


def test_partition_study_scripts(tmp_path, monkeypatch):
    """partition_study.sh parses and refuses an unknown method; the mixture it partitions holds a
    run's train and validation rows, labelled, and never its test rows; the flagged/plain mixture
    is labelled by what its prompts say."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    script = SCRIPT.parent / "partition_study.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    done = subprocess.run(["bash", str(script), "words"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "AMA": "false"})
    assert done.returncode == 2 and "unknown method" in done.stderr
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from partition_study import mixture_rows, main

    for task in ("a", "b"):
        unit = tmp_path / "run" / "prepared" / task
        unit.mkdir(parents=True)
        (unit / "_manifest.json").write_text("{}")
        for split in ("train", "validation", "test"):
            pq.write_table(pa.table({k: [f"{task}-{split}-{k}"] for k in ("prompt", "chosen", "rejected")}), unit / f"{split}.parquet")
    main(["mixture", str(tmp_path / "run"), str(tmp_path / "mixed.jsonl")])
    rows = [json.loads(line) for line in (tmp_path / "mixed.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["prompt"]) for r in rows) == [(t, f"{t}-{s}-prompt") for t in ("a", "b") for s in ("train", "validation")]
    flagged = mixture_rows("arithmetic_flagged", 0)
    assert len(flagged) == 600 and sum(r["task"] == "flagged" for r in flagged) == 300
    assert all(("?" in r["prompt"]) == (r["task"] == "flagged") for r in flagged)  # a flagged request is a question in front


def test_lora_study_script_parses_and_compares_what_it_writes():
    script = SCRIPT.parent / "lora_study.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    written = set(re.findall(r"storage\.run_name=(\w+)", text)) - {"imbalance"}
    written |= {f"{run}_eval" for run in re.findall(r"for run in ([\w ]+);", text)[0].split()}
    compared = set(re.findall(r"\$ROOT/(\w+)=", text))
    assert compared == {"lora_specialists_eval", "lora_generalist_eval"} and compared <= written


def test_alpha_phases_averages_seeds_by_phase(tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from alpha_phases import main

    for seed, a in ((0, [0.2] * 3 + [0.6] * 3), (1, [0.4] * 3 + [0.8] * 3)):
        unit = tmp_path / "run" / "generalist" / "ama_h" / f"seed{seed}"
        unit.mkdir(parents=True)
        pq.write_table(pa.table({"step": list(range(6)), "alpha/x": a, "alpha/y": [1 - v for v in a]}), unit / "mixing_history.parquet")
    main([str(tmp_path / "run"), "ama_h", "--phases", "2"])
    out = capsys.readouterr().out
    assert "steps 0-2: x=0.300 y=0.700" in out and "steps 3-5: x=0.700 y=0.300" in out


@pytest.mark.timeout(420)  # may be the first to build the shared tiny run
def test_generation_probe_runs_as_typed_on_a_finished_run(tiny_run):
    """`python scripts/generation_probe.py RUN_DIR MODEL_DIR` prints one judged reply per prompt
    and the count it verified, for the prompts of the run's test split."""
    import sys

    import pyarrow.parquet as pq

    from ama_ray.storage import RunDir

    _, run_dir = tiny_run
    base = RunDir(str(run_dir)).unit("reference", "brackets").manifest()["model"]
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "generation_probe.py"), str(run_dir), base, "--tasks", "brackets", "-n", "3"],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("brackets ")]
    assert len(lines) == 3
    prompts = pq.read_table(run_dir / "prepared" / "brackets" / "test.parquet").sort_by("example_id")["prompt"].to_pylist()[:3]
    for line, prompt in zip(lines, prompts):
        assert repr(prompt[-40:]) in line
    ok = sum(line.startswith("brackets ok ") for line in lines)
    assert f"brackets: {ok} of 3 verified" in done.stdout
