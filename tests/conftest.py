"""Shared pytest setup. The repository root goes on sys.path so tests can import helpers as
`tests.<module>` (e.g. `from tests.badfiles import make_bad_input_folder`) however pytest is started.

`--junit-incremental=PATH` writes a JUnit XML report to PATH after every test (atomically), so a run stopped
from outside (tools/gpu_check.sh's stage limits) keeps the results of the tests it finished; under
pytest-xdist the controlling process writes it.
"""

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Triton 3.9 warns once that its FP-fusion default will change; pin today's default (what the GPU script uses).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_silent_triton_fallback(request):
    """On CUDA, decode() falls back to the torch path for good when the triton kernel fails (with a warning).
    A GPU test must not pass that way: it would compare torch with torch. Fail the test that triggered it."""
    yield
    if request.node.get_closest_marker("gpu") is not None:
        import inrfmt.decode as decode_mod

        failed = decode_mod._auto_triton_failed
        assert failed is None, f"the triton decoder fell back to torch: {failed}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one torch CPU thread: its fits are many small ops, which two threads only slow down
    on a busy 2-core box (hand-offs), and results are then bitwise comparable with single-threaded
    subprocesses. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.addoption("--junit-incremental", metavar="PATH", default=None,
                     help="write a JUnit XML report to PATH after every test")


class _IncrementalJunit:
    """Collects each test's outcome (its worst phase) and rewrites the report after every test."""

    _RANK = {"passed": 0, "skipped": 1, "failed": 2}

    def __init__(self, path: str):
        self.path = Path(path)
        self.cases: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        case = self.cases.setdefault(report.nodeid, {"outcome": "passed", "time": 0.0, "message": "", "text": ""})
        case["time"] += report.duration
        if self._RANK[report.outcome] > self._RANK[case["outcome"]]:
            case["outcome"] = report.outcome
            case["text"] = str(report.longrepr) if report.longrepr else ""
            case["message"] = case["text"].splitlines()[-1] if case["text"] else ""
        if report.when == "teardown":
            self.write()

    def write(self) -> None:
        counts = {k: sum(c["outcome"] == k for c in self.cases.values()) for k in ("failed", "skipped")}
        suite = ET.Element("testsuite", name="pytest", tests=str(len(self.cases)), failures=str(counts["failed"]),
                           errors="0", skipped=str(counts["skipped"]),
                           time=f"{sum(c['time'] for c in self.cases.values()):.3f}")
        for nodeid, case in self.cases.items():
            path, _, name = nodeid.partition("::")
            element = ET.SubElement(suite, "testcase", classname=path.replace("/", ".").removesuffix(".py"),
                                    name=name, time=f"{case['time']:.3f}")
            if case["outcome"] in ("failed", "skipped"):
                tag = "failure" if case["outcome"] == "failed" else "skipped"
                ET.SubElement(element, tag, message=case["message"]).text = case["text"]
        tmp = self.path.with_name(self.path.name + ".tmp")
        root = ET.Element("testsuites")
        root.append(suite)
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, self.path)


def pytest_configure(config):
    path = config.getoption("--junit-incremental")
    if path and not hasattr(config, "workerinput"):  # under xdist: the controlling process only
        config.pluginmanager.register(_IncrementalJunit(path), "junit-incremental")
