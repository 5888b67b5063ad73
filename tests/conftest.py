import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spinning on a shared, busy machine.

    Use in a test module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tmp_home(tmp_path, monkeypatch) -> Path:
    """CLTRACE_HOME (models, corpus, runs) in the test's own temporary folder: tmp_path / "home".

    Use in a test module: ``pytestmark = pytest.mark.usefixtures("tmp_home")``.
    """
    monkeypatch.setenv("CLTRACE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, one per test module (tests/browser.py)."""
    from browser import launch

    with launch() as chromium:
        yield chromium


@pytest.fixture
def page(browser):
    """A fresh page whose page and console errors collect in `page.errors` (tests/browser.py)."""
    from browser import open_page

    with open_page(browser) as page:
        yield page
