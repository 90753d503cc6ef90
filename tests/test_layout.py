"""The library stands alone: importing it loads nothing of the testbed or the command line, and the import
contracts of pyproject.toml (layers, forbidden imports, no cycles) hold."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_tsc_fast_loads_no_testbed_or_cli_module():
    code = ("import sys, tsc_fast; print(sorted(m for m in sys.modules "
            "if m.startswith(('tsc_fast.testbed', 'tsc_fast.cli'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
    public = ("purify", "TSCConfig", "TSCResult", "discover", "permute", "check_invariance", "unalign", "realign",
              "assign", "PermutationSpec")
    names = subprocess.run([sys.executable, "-c", "import tsc_fast; print(' '.join(tsc_fast.__all__))"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert set(public) <= set(names)


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed")
    run = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "broken" in run.stdout and "0 broken" in run.stdout
