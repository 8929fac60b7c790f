"""The persistent compilation cache the CLI turns on (hierdsl/cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest

import hierdsl
from hierdsl import cache, cli

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.fixture
def no_cache_dir():
    """JAX without a cache folder for the test (the session's own, from conftest, put back after)."""
    before = jax.config.jax_compilation_cache_dir
    before_min = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before_min)


def test_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "name", "posix")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.default_cache_dir() == os.path.join(str(tmp_path), "hierdsl", "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.default_cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "hierdsl", "jax")


def test_enable_uses_the_environment_folder(no_cache_dir, monkeypatch, tmp_path):
    folder = tmp_path / "a" / "b"
    monkeypatch.setenv(cache.ENV_VAR, str(folder))
    assert hierdsl.enable_compilation_cache() == str(folder)
    assert folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == cache.MIN_COMPILE_SECONDS


@pytest.mark.parametrize("setting", ["off", "OFF", "0", "none"])
def test_environment_switches_it_off(no_cache_dir, monkeypatch, setting, tmp_path):
    monkeypatch.setenv(cache.ENV_VAR, setting)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hierdsl.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    assert not (tmp_path / "hierdsl").exists()
    # An explicit folder still turns it on.
    assert hierdsl.enable_compilation_cache(str(tmp_path / "x")) == str(tmp_path / "x")


def test_a_folder_jax_was_given_is_kept(no_cache_dir, monkeypatch, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "other"))
    assert hierdsl.enable_compilation_cache() == str(tmp_path / "mine")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    assert not (tmp_path / "other").exists()


def test_a_folder_that_cannot_be_made_leaves_it_off(no_cache_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert hierdsl.enable_compilation_cache(str(blocker / "jax")) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_cli_reads_the_environment_for_commands_that_compile(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cache, "cache_from_environment", lambda: calls.append(1))
    model = os.path.join(EXAMPLES, "gaussian_linear.hsbi")
    assert cli.main(["compile", model]) == 0
    assert calls == []
    assert cli.main(["simulate", model, "--sites", "2", "-o", str(tmp_path / "d.csv")]) == 0
    assert calls == [1]


def test_the_cli_cache_is_off_unless_asked_for(no_cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    assert cache.cache_from_environment() is None
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "hierdsl").exists()
    monkeypatch.setenv(cache.ENV_VAR, "off")
    assert cache.cache_from_environment() is None and jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv(cache.ENV_VAR, "on")
    assert cache.cache_from_environment() == os.path.join(str(tmp_path), "hierdsl", "jax")
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "here"))
    assert cache.cache_from_environment() == str(tmp_path / "here")
    # A folder JAX was given (JAX_COMPILATION_CACHE_DIR) is used as it is, with or without ours.
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax's"))
    monkeypatch.delenv(cache.ENV_VAR)
    assert cache.cache_from_environment() == str(tmp_path / "jax's")


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    """Two fresh processes compile the same slow-to-compile program: the first writes it to the
    cache folder, the second reads it back instead of compiling."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, sys
        from jax import monitoring
        hits = []
        monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                           if event == "/jax/compilation_cache/cache_hits" else None)
        import hierdsl
        print(hierdsl.enable_compilation_cache())

        @jax.jit
        def slow(x):
            for i in range(300):  # unrolled: XLA takes well over the threshold to compile it
                x = jnp.sin(x @ x.T + i)[:, :4] @ jnp.ones((4, 4)) + x
            return x

        slow(jnp.ones((4, 4))).block_until_ready()
        print(len(hits))
    """)
    env = {**os.environ, cache.ENV_VAR: str(tmp_path / "jc")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    first, second = (subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
                     for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    folder, hits = first.stdout.split()
    assert folder == str(tmp_path / "jc") and hits == "0"
    folder, hits = second.stdout.split()
    # At least the slow program (a small one may be kept too, where the machine compiled it slowly).
    assert folder == str(tmp_path / "jc") and int(hits) >= 1
    assert any(name.startswith("jit_slow-") for name in os.listdir(tmp_path / "jc"))
