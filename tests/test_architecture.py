"""The package's layering (docs/ARCHITECTURE.md): import-linter contracts hold, they do fail on a violation, and
every module imports on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the package under `root`, with `root`'s pyproject contracts."""
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml")], cwd=root, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, timeout=600)


def _modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "rayblora").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_import_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_contracts_name_a_ray_import_in_the_core_an_upward_import_and_a_cycle(tmp_path):
    shutil.copytree(ROOT / "rayblora", tmp_path / "rayblora", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "rayblora" / "metrics.py", "a") as fh:
        fh.write("\nimport ray  # noqa\n")
    with open(tmp_path / "rayblora" / "config" / "sections.py", "a") as fh:
        fh.write("\nfrom rayblora import scoring  # noqa\n")
    with open(tmp_path / "rayblora" / "posteriors" / "base.py", "a") as fh:
        fh.write("\ndef _late():\n    from rayblora.posteriors import swag  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    out = " ".join(result.stdout.split())
    assert "rayblora.metrics is not allowed to import ray" in out
    assert "rayblora.config is not allowed to import rayblora.scoring" in out
    assert "rayblora.config.sections -> rayblora.scoring" in out
    assert "No cycles are allowed in rayblora.posteriors" in out and ".swag -> .base" in out


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh interpreter as far as rayblora goes: every rayblora module is
    dropped from sys.modules before the next one is imported (third-party packages stay loaded, so the whole
    package costs one interpreter). A cycle shows up as an ImportError of a partially initialised module."""
    modules = _modules()
    assert "rayblora.posteriors.hybrid.laplace_prior" in modules and len(modules) > 40
    script = (
        "import importlib, sys, traceback\n"
        f"failed = []\nfor name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'rayblora' or m.startswith('rayblora.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception:\n        failed.append(name + ': ' + traceback.format_exc().splitlines()[-1])\n"
        "print('\\n'.join(failed))\nsys.exit(1 if failed else 0)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_the_once_broken_import_works_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-c", "import rayblora.posteriors.hybrid.laplace_prior"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_config_validates_method_names_without_importing_a_family_or_torch():
    script = ("import sys\nfrom rayblora.config import ConfigError, load_config\n"
              "load_config(None, ['posterior.method=multiswag', 'posterior.eval_methods=[map,laplace]'])\n"
              "try:\n    load_config(None, ['posterior.method=nope'])\nexcept ConfigError as exc:\n    print(exc)\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'transformers')\n"
              "             or m.startswith('rayblora.posteriors')))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    error, loaded = result.stdout.strip().splitlines()
    assert "posterior.method" in error and "multiswag" in error and "'nope'" in error
    assert loaded == "[]"


def test_every_registered_family_resolves_to_its_class():
    from rayblora.posteriors import Posterior
    from rayblora.registry import BUILTIN, available_methods, get_posterior_class

    assert set(BUILTIN) <= set(available_methods())
    for name in BUILTIN:
        cls = get_posterior_class(name)
        assert issubclass(cls, Posterior) and cls.method == name
    try:
        get_posterior_class("nope")
    except KeyError as exc:
        assert "known methods" in str(exc) and "ensemble" in str(exc)
    else:
        raise AssertionError("an unknown method resolved")


def test_in_process_training_and_evaluation_import_no_ray():
    """`train(in_process=True)` and evaluation run where Ray is not installed (a bare GPU machine)."""
    code = ("import sys; import rayblora.workflows.train, rayblora.workflows.evaluate; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
