"""The package imports wherever it is installed: from the built wheel, from an editable
install, and with the repository root as the working directory (where the checkout's
``fastdiff/`` shadows the installed copy and has no ``kernels/`` inside it)."""

import importlib.util
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import fastdiff, fastdiff.kernels.reference as r; print(fastdiff.__file__); print(r.__file__)"
)


def _setuptools_can_build() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from this checkout and installed into a bare target dir."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist")]
    if _setuptools_can_build():
        build.append("--no-build-isolation")  # works offline
    subprocess.run([*build, str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("fastdiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdiff/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels/ was packaged"
    target = tmp / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return target


def _run_without_site(target: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run python with the wheel's target dir first and the dependencies' site-packages after,
    but without ``site`` (-S): no .pth files, so an editable install's finder is not loaded
    and the interpreter sees fastdiff exactly as a non-editable install provides it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), *site.getsitepackages()])
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_wheel_imports_from_the_checkout_root(installed_wheel):
    result = _run_without_site(installed_wheel, ["-c", PROBE], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    package, kernels = result.stdout.split()
    # The checkout shadows the wheel; its kernels/ is mounted as fastdiff.kernels.
    assert Path(package) == ROOT / "fastdiff" / "__init__.py"
    assert Path(kernels) == ROOT / "kernels" / "reference.py"


def test_wheel_runs_python_dash_m_from_the_checkout_root(installed_wheel):
    result = _run_without_site(installed_wheel, ["-m", "fastdiff", "--help"], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "usage: fastdiff" in result.stdout


def test_wheel_elsewhere_uses_its_own_kernels(installed_wheel, tmp_path):
    result = _run_without_site(installed_wheel, ["-c", PROBE], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    package, kernels = result.stdout.split()
    assert Path(package) == installed_wheel / "fastdiff" / "__init__.py"
    assert Path(kernels) == installed_wheel / "fastdiff" / "kernels" / "reference.py"


def test_this_environment_imports_from_the_checkout_root():
    """The test environment's own install (editable in CI) with the root as working dir."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.split()[1]) == ROOT / "kernels" / "reference.py"
