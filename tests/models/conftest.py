"""Real-model tests: the ``slow`` marker (run by default; ``-m "not slow"`` skips it) and an error summary.

Under ``-v`` (pyproject.toml adds ``-q``) the terminal summary lists, per test, the largest absolute
error, the largest error relative to each tensor's scale, and the smallest rtol (with atol = rtol / 10)
that the compiled training step would pass against eager.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.training_step import ERRORS

_HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a slow real-model variant (runs by default; deselect with -m 'not slow')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:  # noqa: ARG001
    """torch.jit.script/freeze warn on every call (deprecation, annotations); these tests do not judge that."""
    for item in items:
        if item.path.parent == _HERE:
            item.add_marker(pytest.mark.filterwarnings("ignore::FutureWarning"))
            item.add_marker(pytest.mark.filterwarnings("ignore:The TorchScript type system:UserWarning"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run torch single-threaded here. On 2 shared cores, torch's OpenMP threads spin while other
    processes hold the cores: the same step measured 5 s alone and 130 s under contention."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if not ERRORS or config.getoption("verbose") < 0:  # pyproject adds -q: shown with -v
        return
    terminalreporter.section("real models: compiled training step vs eager")
    width = max(len(name) for name in ERRORS)
    terminalreporter.write_line(f"{'test':<{width}}  {'max abs':>9}  {'max rel':>9}  {'rtol>=':>9}  "
                                "worst tensor (of compared)")
    for name, e in sorted(ERRORS.items()):
        terminalreporter.write_line(f"{name:<{width}}  {e.max_abs:9.2e}  {e.max_rel:9.2e}  {e.needed_rtol:9.2e}  "
                                    f"{e.worst} (of {e.compared})")
    terminalreporter.write_line("max rel: max|got - want| / max(max|want|, 1e-3) per tensor; "
                                "rtol>=: the smallest rtol that passes with atol = rtol / 10")
