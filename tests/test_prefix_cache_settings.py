"""The prefix caching switch: ServerSettings field, --enable-prefix-caching / --no-enable-prefix-caching,
GLM4SERVE_ENABLE_PREFIX_CACHING, and its way through EngineArgs into the scheduler."""

from __future__ import annotations

import pytest

from glm4serve import cli, server
from glm4serve.api.settings import ServerSettings
from glm4serve.engine.config import EngineArgs


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("GLM4SERVE_"):
            monkeypatch.delenv(key)


def settings_of(*flags: str) -> ServerSettings:
    return cli.settings_from_args(cli.build_parser().parse_args(["serve", *flags]))


def test_on_by_default_and_flags_turn_it_off_and_on(monkeypatch):
    assert ServerSettings().enable_prefix_caching is True
    assert settings_of().enable_prefix_caching is True
    assert settings_of("--no-enable-prefix-caching").enable_prefix_caching is False
    monkeypatch.setenv("GLM4SERVE_ENABLE_PREFIX_CACHING", "false")
    assert settings_of().enable_prefix_caching is False  # the env applies when the CLI is silent
    assert settings_of("--enable-prefix-caching").enable_prefix_caching is True  # CLI over env


def test_engine_args_carry_it_to_the_scheduler():
    assert EngineArgs().scheduler_config(1024, "cpu").enable_prefix_caching is True
    assert EngineArgs(enable_prefix_caching=False).scheduler_config(1024, "cpu").enable_prefix_caching is False


@pytest.mark.parametrize("flag, expected", [("--no-enable-prefix-caching", False), ("--enable-prefix-caching", True)])
def test_build_engine_passes_the_setting_on(monkeypatch, flag, expected):
    seen = []

    class Stop(Exception):
        pass

    def build_llm_engine(args):
        seen.append(args)
        raise Stop

    monkeypatch.setattr(server, "build_llm_engine", build_llm_engine)
    with pytest.raises(Stop):
        server.build_engine(settings_of(flag, "--device", "cpu", "--kv-cache-memory", "1MiB"))
    assert seen[0].enable_prefix_caching is expected
