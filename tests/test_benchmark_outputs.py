"""Studies write where the user says (``--output``, default ``./results/<study>/``), never into the package."""

import re
from pathlib import Path

import diffalign.benchmarks
import pytest

FOLDER = Path(diffalign.benchmarks.__path__[0])
STUDIES = sorted(p for p in FOLDER.glob("*.py") if "def main(" in p.read_text("utf-8"))


def test_there_are_studies():
    assert {p.stem for p in STUDIES} >= {
        "gradient_snr",
        "perf",
        "protection",
        "shapes_quality",
        "cli_startup",
    }


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_output_defaults_to_results_under_the_current_folder(path):
    text = path.read_text("utf-8")
    assert not re.search(r"__file__\)?[^\n]*results", text), "writes into the installed package"
    defaults = re.findall(r'"--output",[^)]*?default="([^"]+)"', text, re.DOTALL)
    assert defaults == [f"results/{path.stem}"]


def test_a_study_writes_into_the_folder_given(tmp_path, monkeypatch):
    from diffalign.benchmarks import import_graph

    monkeypatch.chdir(tmp_path)
    assert import_graph.main(["--quiet"]) == 0
    assert (tmp_path / "results" / "import_graph" / "import_graph.json").is_file()
