import pytest


def pytest_addoption(parser):
    parser.addoption("--torture-long", action="store_true", default=False,
                     help="run the long torture (at least 500 carrier drops and 200 kill -9s) and print the report")


@pytest.fixture
def torture_long(request) -> bool:
    # Without the option registered (tests/torture not named on the command line) it is the short run.
    return bool(request.config.getoption("--torture-long", default=False))
