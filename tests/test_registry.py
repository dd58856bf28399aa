from dataclasses import dataclass

import pytest

from selfloop.errors import PluginError, UnknownStrategyError
from selfloop.registry import Registry


@dataclass
class Opts:
    k: int = 1


class GoodFilter:
    name = "good"
    Config = Opts

    def filter(self, ctx, data):
        return data


def test_register_and_get():
    reg = Registry()
    reg.add("filter", GoodFilter, "myplugin", "selfloop-my", "1.2")
    entry = reg.get("filter", "good")
    assert entry.cls is GoodFilter and entry.plugin == "myplugin" and entry.version == "1.2"
    assert reg.by_plugin() == {"myplugin": {"filter": ["good"]}}


def test_unknown_name_lists_installed():
    reg = Registry()
    reg.add("filter", GoodFilter, "p")
    with pytest.raises(UnknownStrategyError, match=r"unknown filter 'nope'; installed: good"):
        reg.get("filter", "nope")


def test_duplicate_from_another_plugin_is_refused_and_first_kept():
    reg = Registry()
    reg.add("filter", GoodFilter, "first", "selfloop", "0.1")

    class Impostor(GoodFilter):
        pass

    with pytest.raises(PluginError, match=r"plugin 'second' \(selfloop-x 9\).*already registered by plugin 'first' \(selfloop 0.1\)"):
        reg.add("filter", Impostor, "second", "selfloop-x", "9")
    assert reg.get("filter", "good").cls is GoodFilter


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"name": "Bad Name", "filter": lambda s, c, d: d}, "valid `name`"),
        ({"name": "nocfg", "Config": dict, "filter": lambda s, c, d: d}, "not a dataclass"),
        ({"name": "nomethod"}, "lacks the method"),
    ],
)
def test_invalid_registrations_name_the_culprit(attrs, message):
    cls = type("Broken", (), attrs)
    with pytest.raises(PluginError, match=message) as err:
        Registry().add("filter", cls, "culprit_plugin", "selfloop-culprit", "0.0.1")
    assert "culprit_plugin" in str(err.value)


def test_unknown_kind():
    with pytest.raises(PluginError, match="kinds are"):
        Registry().add("decorate", GoodFilter, "p")
