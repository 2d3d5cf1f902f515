"""The wheel is the product: built with ``python -m build``, installed alone into a new venv.

Slow on purpose (~40 s on a quiet machine, marked ``slow``): it builds the sdist and the wheel
(an isolated build, so setuptools comes from the package index or pip's cache) and installs the
wheel's runtime dependencies, pinned by ``constraints.txt``, into a new venv. pip resolves them
from the wheel's own metadata, so a dependency the code imports but ``setup.cfg`` does not declare
fails here, and none of the test extras can hide it. Then the installed ``parkway`` runs its demo,
signs a URL, and serves a request through it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest
import trio

from proxy import __version__
from support.processes import ProcessLogs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# What building reads; copied so the build writes its egg-info and build/ into tmp, not the checkout.
SOURCES = ("proxy", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in")


def run(*argv: str | Path, timeout: float, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel), built from a copy of the sources; the wheel is built from the sdist."""
    tmp = tmp_path_factory.mktemp("build")
    source = tmp / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "build", "--outdir", tmp / "dist", source, timeout=240, cwd=tmp)
    (sdist,) = (tmp / "dist").glob("parkway-*.tar.gz")
    (wheel,) = (tmp / "dist").glob("parkway-*.whl")
    return sdist, wheel


def test_the_wheel_carries_every_module_and_nothing_else(built: tuple[Path, Path]) -> None:
    sdist, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "proxy").rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)}"
    info = f"parkway-{__version__}.dist-info/"
    assert {n for n in names if not n.startswith(info)} == modules  # no tests/, loadtest/, data files
    metadata = zipfile.ZipFile(wheel).read(info + "METADATA").decode()
    requires = [
        line.removeprefix("Requires-Dist:").strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    runtime = {normalized(re.split(r"[<>=!~;\s\[]", line)[0]) for line in requires if "extra ==" not in line}
    optional = {  # an extra other than the test tools', such as otel: an optional feature's imports
        normalized(re.split(r"[<>=!~;\s\[]", line)[0]) for line in requires if re.search(r'extra == "(?!test)', line)
    }
    assert not {"pytest", "mypy", "ruff", "build", "hypothesis"} & runtime
    # Everything proxy imports is declared, not only reached through another package's requirements:
    # one of the distributions that provide the top-level name (opentelemetry has several).
    distributions = importlib.metadata.packages_distributions()
    undeclared = sorted(
        top
        for top in third_party_imports(ROOT / "proxy")
        if not {normalized(d) for d in distributions.get(top, [top])} & (runtime | optional)
    )
    assert not undeclared, f"imported but declared neither in install_requires nor in an extra: {undeclared}"
    with tarfile.open(sdist) as archive:
        members = [m.split("/", 1)[1] for m in archive.getnames() if "/" in m]
    assert not [m for m in members if m.startswith(("tests/", "loadtest/"))]


def normalized(distribution: str) -> str:
    """A distribution's name as the package index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def third_party_imports(package: Path) -> set[str]:
    """Top-level names of the modules ``package`` imports, less the standard library and itself."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {package.name}


async def test_a_new_venv_with_the_wheel_alone_runs_demo_sign_and_serve(
    built: tuple[Path, Path], tmp_path: Path, nursery: trio.Nursery
) -> None:
    _, wheel = built
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PARKWAY"))}

    async def run_in_venv(*argv: str | Path, timeout: float) -> str:
        with trio.fail_after(timeout):
            done = await trio.run_process(
                [str(a) for a in argv], cwd=tmp_path, env=env, capture_stdout=True, capture_stderr=True, check=False
            )
        out, err = done.stdout.decode(), done.stderr.decode()
        assert done.returncode == 0, f"{argv} exited {done.returncode}\n{out[-3000:]}\n{err[-3000:]}"
        return out

    pip = (bin_dir / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check")
    await run_in_venv(*pip, "-c", ROOT / "constraints.txt", wheel, timeout=300)

    # The installed package, not this checkout's, and none of the test extras.
    where = await run_in_venv(bin_dir / "python", "-c", "import proxy; print(proxy.__file__)", timeout=30)
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")
    listed = await run_in_venv(bin_dir / "python", "-m", "pip", "list", "--format=freeze", timeout=60)
    assert not {"pytest", "mypy", "ruff", "build"} & {line.split("==")[0].lower() for line in listed.splitlines()}

    parkway = bin_dir / "parkway"
    out = await run_in_venv(parkway, "demo", "--once", "--delay", "0", timeout=60)
    assert "signature verified: job.completed" in out and "answer> Parkway verified the signed URL" in out

    # serve (Signway's command line) and sign: a signed GET through Parkway to its own admin /healthz.
    argv = [parkway, "serve", "demo", "s3cret", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    server = await trio.lowlevel.open_process(
        [str(a) for a in [*argv, "--allow-private-upstreams"]],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        logs = ProcessLogs()
        nursery.start_soon(logs.pump, server.stderr)
        (startup,) = await logs.wait_for(event="startup", timeout=30)
        (listen,), (admin,) = startup["listen"], startup["admin"]
        signed = await run_in_venv(
            parkway, "sign", "--id", "demo", "--secret", "s3cret", "--method", "GET",
            "--host", f"http://{listen}", "--proxy", f"http://{admin}/healthz", timeout=30,
        )  # fmt: skip
        with trio.fail_after(30):
            status, body = await trio.to_thread.run_sync(fetch, signed.strip())
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    finally:
        server.terminate()
        with trio.fail_after(30):
            await server.wait()


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=20) as response:
        return response.status, response.read()
