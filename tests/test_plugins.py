import json
import subprocess
import sys
import types
from importlib.metadata import EntryPoint

import pytest

from selfloop import hookimpl
from selfloop import plugins as plugins_mod
from selfloop.errors import PluginError
from selfloop.plugins import PluginWarning, load_plugins

BUILTIN_STRATEGIES = {
    "task": {"reversal", "addition"},
    "model": {"tiny", "pretrained"},
    "acquire": {"task_sampler"},
    "filter": {"uncertainty", "roundtrip"},
    "optimize": {"sft"},
    "refine": {"self_consistency"},
    "evaluate": {"self_consistency", "exact_match"},
}


def test_builtins_register_through_entry_points(plugins):
    for kind, names in BUILTIN_STRATEGIES.items():
        assert names <= set(plugins.registry.names(kind)), kind
        for name in names:
            assert plugins.registry.get(kind, name).distribution == "selfloop"
    assert not plugins.problems()


def _with_extra_entry_points(monkeypatch, *extra):
    real = plugins_mod.entry_points

    def fake(group):
        return [*real(group=group), *extra]

    monkeypatch.setattr(plugins_mod, "entry_points", fake)


def test_broken_plugin_is_reported_and_others_still_load(monkeypatch):
    broken = EntryPoint(name="broken_one", value="selfloop_no_such_module_xyz", group="selfloop")
    _with_extra_entry_points(monkeypatch, broken)
    with pytest.warns(PluginWarning, match=r"broken_one.*failed to import selfloop_no_such_module_xyz.*ModuleNotFoundError"):
        loaded = load_plugins(strict=False)
    assert "uncertainty" in loaded.registry.names("filter")
    assert loaded.info["broken_one"].error


def test_strict_mode_makes_a_broken_plugin_fatal(monkeypatch):
    _with_extra_entry_points(monkeypatch, EntryPoint(name="broken_one", value="selfloop_no_such_module_xyz", group="selfloop"))
    monkeypatch.setenv("SELFLOOP_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="broken_one"):
        load_plugins()


def test_hook_that_raises_is_isolated():
    raising = types.ModuleType("raising")

    @hookimpl
    def selfloop_register_filters(register):
        raise RuntimeError("boom")

    raising.selfloop_register_filters = selfloop_register_filters
    with pytest.warns(PluginWarning, match=r"'raising'.*raised in selfloop_register_filters: RuntimeError: boom"):
        loaded = load_plugins(extra={"raising": raising}, strict=False)
    assert "uncertainty" in loaded.registry.names("filter")


def test_duplicate_name_keeps_the_builtin():
    dup = types.ModuleType("dup")

    class Uncertainty:
        name = "uncertainty"

        def filter(self, ctx, data):
            return data

    @hookimpl
    def selfloop_register_filters(register):
        register(Uncertainty)

    dup.selfloop_register_filters = selfloop_register_filters
    with pytest.warns(PluginWarning, match="already registered by plugin 'uncertainty'"):
        loaded = load_plugins(extra={"dup": dup}, strict=False)
    assert loaded.registry.get("filter", "uncertainty").plugin == "uncertainty"


def test_disable_plugins_env(monkeypatch):
    monkeypatch.setenv("SELFLOOP_DISABLE_PLUGINS", "addition")
    loaded = load_plugins()
    assert "addition" not in loaded.registry.names("task")
    assert "reversal" in loaded.registry.names("task")


def test_plugins_command_lists_json_without_importing_torch():
    code = (
        "import sys, json, io, contextlib\n"
        "from selfloop.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf): main(['plugins', '--json'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules]\n"
        "print(json.dumps({'out': json.loads(buf.getvalue()), 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout)
    assert result["heavy"] == []
    by_name = {p["name"]: p for p in result["out"]["plugins"]}
    assert by_name["uncertainty"]["provides"] == {"filter": ["uncertainty"]}
    assert by_name["uncertainty"]["hooks"] == ["selfloop_register_filters"]
    assert by_name["sft"]["distribution"] == "selfloop"


def test_a_registration_hook_that_returns_classes_is_told_to_register_them():
    returning = types.ModuleType("returning")

    class Mine:
        name = "mine"

        def filter(self, ctx, data):
            return data

    returning.selfloop_register_filters = hookimpl(lambda register: [Mine])
    with pytest.warns(PluginWarning, match=r"'returning'.*selfloop_register_filters returned a list; call register\(cls\)"):
        loaded = load_plugins(extra={"returning": returning}, strict=False)
    assert "mine" not in loaded.registry.names("filter")


def test_registering_an_instance_or_a_class_without_its_method_is_refused():
    module = types.ModuleType("sloppy")

    class NoMethod:
        name = "no_method"

    module.selfloop_register_filters = hookimpl(lambda register: register(NoMethod))
    with pytest.raises(PluginError, match=r"plugin 'sloppy'.*filter 'no_method' lacks the method\(s\) filter"):
        load_plugins(extra={"sloppy": module}, strict=True)


def test_plugins_lists_presets_of_installed_packages(fake_presets):
    from selfloop.cli import plugins_summary

    summary = plugins_summary()
    assert {"name": "fake", "package": "fake_presets", "distribution": "fake-presets", "version": "0.3", "presets": ["loop/tight"]} in summary["presets"]



def test_an_in_process_plugin_that_is_also_installed_is_registered_once():
    # a contract suite passes the installed module again, as an in-process plugin
    import selfloop_plugins.filter.dedup as installed

    from selfloop.plugins import load_plugins

    plugins = load_plugins(extra={"under_test": installed}, strict=True)
    assert "dedup" in plugins.registry.names("filter") and "under_test" not in plugins.info
