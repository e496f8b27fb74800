"""``beit-env`` and the package boundaries."""

import subprocess
import sys

import beit_kernels
from beit.env import collect, main


def test_collect_reports_versions_and_auto_choice():
    info = collect()
    for key in ("python", "torch", "triton", "nvidia-dali", "xformers"):
        assert key in info and info[key]
    assert any(k.startswith("impl 'auto'") and v in ("ref", "sdpa", "triton") for k, v in info.items())
    assert info["beit_kernels"] == beit_kernels.__version__


def test_main_prints_a_table(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "impl 'auto'" in out


def test_beit_kernels_does_not_import_beit():
    code = "import sys, beit_kernels; assert 'beit' not in sys.modules, sorted(m for m in sys.modules if 'beit' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "beit.env"], check=True, capture_output=True, text=True).stdout
    assert "beit_kernels" in out
