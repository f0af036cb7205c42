"""The licence the package declares is the one it ships: pyproject.toml's SPDX expression and
the LICENSE file's text (the Apache License 2.0, whole, with its appendix)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_is_the_apache_2_text_pyproject_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    words = " ".join(text.split())
    assert words.startswith("Apache License Version 2.0, January 2004 "
                            "http://www.apache.org/licenses/ TERMS AND CONDITIONS FOR USE, "
                            "REPRODUCTION, AND DISTRIBUTION 1. Definitions.")
    sections = re.findall(r"^\s+(\d)\. ([A-Z][A-Za-z ]+)\.", text, flags=re.MULTILINE)
    assert [n for n, _ in sections] == [str(i) for i in range(1, 10)]
    assert sections[-1][1] == "Accepting Warranty or Additional Liability"
    assert "END OF TERMS AND CONDITIONS" in words
    assert words.endswith('See the License for the specific language governing permissions and '
                          'limitations under the License.')
    assert len(words) > 10000  # the whole licence, not a notice pointing at it
