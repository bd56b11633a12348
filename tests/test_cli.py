import subprocess
import sys
from pathlib import Path

import yaml

from ama_ray.cli import STAGE_HELP, main

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "ama_ray.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in [*STAGE_HELP, "models", "config", "config-docs"]:
        assert name in out


def test_user_error_is_one_line_and_exit_2(capsys):
    assert main(["config", "mixing.smoothing=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mixing.smoothing" in err and err.startswith("ama-ray: error:")


def test_unknown_force_stage_is_a_user_error(capsys):
    assert main(["prepare", "--force", "bogus"]) == 2
    assert "--force bogus" in capsys.readouterr().err


def test_config_prints_resolved_yaml_with_algorithm_shorthand(capsys):
    assert main(["config", "--algorithm", "ama_r", "mixing.eta_alpha=0.5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["generalist"]["algorithms"] == ["ama_r"] and cfg["mixing"]["eta_alpha"] == 0.5


def test_config_docs_matches_file(capsys):
    assert main(["config-docs"]) == 0
    assert capsys.readouterr().out == (ROOT / "docs" / "configuration.md").read_text()
