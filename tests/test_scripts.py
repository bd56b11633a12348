"""scripts/ablation.sh, the evidence script of docs/results.md: it parses, refuses an unknown
configuration with exit 2 before running anything, and every run directory it compares is one
it writes (a renamed variant would leave `ama-ray compare` a missing run)."""

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
