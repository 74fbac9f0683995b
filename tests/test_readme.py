"""Every Python code block in README.md runs, each in a fresh interpreter."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(),
                    flags=re.S | re.M)


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 2  # the linen and NNX loops at least


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
  script = tmp_path / f"block{index}.py"
  script.write_text(BLOCKS[index])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, (
      f"README block {index} failed:\n{BLOCKS[index][:300]}...\n"
      f"{result.stderr[-4000:]}")
