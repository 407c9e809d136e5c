"""The public surface: what __all__ promises is what the package exports, named shmfeed.*."""

from __future__ import annotations

import pytest

import shmfeed

pytestmark = pytest.mark.timeout(30)


def test_all_names_are_exported_and_nothing_public_is_missing():
    public = {name for name in dir(shmfeed) if not name.startswith("_")}
    assert set(shmfeed.__all__) <= public
    modules = {"annotations", "testing"}  # shmfeed.testing, once imported
    assert public - set(shmfeed.__all__) - modules == set()


@pytest.mark.parametrize("name", shmfeed.__all__)
def test_public_objects_say_they_live_in_shmfeed(name):
    obj = getattr(shmfeed, name)
    if isinstance(obj, type) or callable(obj):
        assert obj.__module__ == "shmfeed"


def test_every_library_error_derives_from_the_root():
    for name in shmfeed.__all__:
        obj = getattr(shmfeed, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, shmfeed.ShmfeedError), name
    assert issubclass(shmfeed.FeedTypeError, TypeError)
    assert issubclass(shmfeed.EncodingError, TypeError)
    assert shmfeed.ErrMuxClosed is shmfeed.MuxClosedError
    assert str(shmfeed.MuxClosedError()) == "event: mux closed"


def test_public_api_has_docstrings():
    for name in ("Channel", "Feed", "Subscription", "select", "register_type"):
        assert getattr(shmfeed, name).__doc__, name


def test_the_readme_documents_every_public_name():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert [name for name in shmfeed.__all__ if f"`{name}" not in readme and f"{name}(" not in readme] == []


def test_only_exported_objects_claim_to_live_in_shmfeed():
    # A traceback or repr naming shmfeed.X must name something `from shmfeed import X` gives.
    import importlib
    import inspect
    import pkgutil

    claiming = []
    for info in pkgutil.iter_modules(shmfeed.__path__):
        if info.name in ("_registry", "_cli", "_monitor"):  # entry points, import rich etc.
            continue
        module = importlib.import_module(f"shmfeed.{info.name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == "shmfeed":
                claiming.append((info.name, name, obj))
    assert claiming, "the walk found nothing: it tests nothing"
    wrong = [f"{module}.{name}" for module, name, obj in claiming if getattr(shmfeed, obj.__name__, None) is not obj]
    assert wrong == []
