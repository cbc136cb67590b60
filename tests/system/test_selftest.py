"""`glmpool selftest` end to end: a real two-worker cpu pool on a temporary spool (about 45 s)."""

import subprocess
import sys


def test_selftest_passes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from glmpool.cli import main; sys.exit(main(['selftest', "
         f"'--workdir', {str(tmp_path / 'work')!r}, '--timeout', '90']))"],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("selftest PASSED: 7/7")
    assert sum(line.startswith("PASS ") for line in lines) == 7
    assert "SIGKILL a worker mid-generation" in proc.stdout
