"""Packaging: `pip install .` compiles the BPF object into the package (or takes the
prebuilt one); the installed `redtap` finds and loads it without the source tree;
`redtap --version`; the systemd unit verifies against that installed layout."""
import os
import shutil
import subprocess
import sys

import pytest

from pyloader import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SKIP_DIRS = {".venv", "build", ".git", "tests", "__pycache__", ".pytest_cache", ".hypothesis"}


def source_copy(dest, prebuilt=False):
    """The project as a user gets it (no venv, no build output, no tests)."""
    def ignore(folder, names):
        out = {n for n in names if n in SKIP_DIRS or n.endswith(".egg-info")}
        if os.path.basename(folder) == "data" and not prebuilt:
            out |= {n for n in names if n.endswith(".o")}
        return out
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def pip_install(src, *args, env=None):
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *args, src],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def run_installed(site, *cmd):
    """Python code or a console script from an install, from /, the source nowhere."""
    env = {**os.environ, "PYTHONPATH": site}
    env.pop("REDTAP_BPF_OBJECT", None)
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, cwd="/",
                          env=env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip install . of a source tree without a prebuilt object, into a staging root
    laid out like the README's /opt/redtap; the source tree is removed afterwards."""
    if shutil.which("clang") is None:
        pytest.fail("clang missing: run `make deps`")
    base = tmp_path_factory.mktemp("install")
    src = source_copy(str(base / "src"))
    prefix = base / "root" / "opt" / "redtap"
    # --ignore-installed: never touch the redtap installed in the running venv
    r = pip_install(src, "--prefix", str(prefix), "--ignore-installed")
    assert r.returncode == 0, r.stderr
    shutil.rmtree(src)
    site = next(str(p) for p in prefix.glob("lib/python3*/site-packages"))
    return base / "root", site


def test_pip_install_compiles_the_bpf_object_into_the_package(installed):
    _, site = installed
    obj = os.path.join(site, "pyloader", "data", "redtap.bpf.o")
    with open(obj, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 247  # EM_BPF


def test_the_lab_is_not_installed(installed):
    """Demo and test tooling (pyloader.lab) stays in the source tree."""
    _, site = installed
    assert os.path.isdir(os.path.join(site, "pyloader", "kernel"))
    assert not os.path.exists(os.path.join(site, "pyloader", "lab"))


def test_installed_redtap_finds_and_loads_its_object(installed):
    _, site = installed
    if os.geteuid() != 0:
        pytest.skip("needs root for bpf()")
    r = run_installed(site, sys.executable, "-c",
                      "from pyloader.kernel.tracer import Tracer, find_object\n"
                      "t = Tracer.load(); print(find_object()); t.close()")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.join(site, "pyloader", "data", "redtap.bpf.o")


def test_installed_redtap_prints_its_version(installed):
    root, site = installed
    r = run_installed(site, str(root / "opt" / "redtap" / "bin" / "redtap"), "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"redtap {__version__}"


def test_systemd_unit_verifies_against_the_installed_layout(installed, tmp_path):
    """systemd-analyze verify with the staging root: the unit's syntax, every
    setting known to this systemd, and ExecStart= an executable that exists."""
    root, _ = installed
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system",
                    symlinks=True, dirs_exist_ok=True)
    (root / "usr" / "bin").mkdir(parents=True, exist_ok=True)   # a node's /bin/kill
    shutil.copy("/usr/bin/kill", root / "usr" / "bin" / "kill")
    if not (root / "bin").exists():
        (root / "bin").symlink_to("usr/bin")
    unit_dir = root / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(ROOT, "deploy", "systemd", "redtap.service"), unit_dir)
    r = subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                        "/etc/systemd/system/redtap.service"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_pip_install_without_clang_takes_the_prebuilt_object(tmp_path):
    prebuilt = os.path.join(ROOT, "src", "pyloader", "data", "redtap.bpf.o")
    if not os.path.exists(prebuilt):
        pytest.fail("no prebuilt object: run `make bpf`")
    src = source_copy(str(tmp_path / "src"), prebuilt=True)
    r = pip_install(src, "--target", str(tmp_path / "t"), env={"CLANG": "/nonexistent/clang"})
    assert r.returncode == 0, r.stderr
    with open(prebuilt, "rb") as a, open(tmp_path / "t" / "pyloader" / "data" /
                                         "redtap.bpf.o", "rb") as b:
        assert a.read() == b.read()


def test_pip_install_without_clang_or_prebuilt_object_says_why(tmp_path):
    src = source_copy(str(tmp_path / "src"))
    r = pip_install(src, "--target", str(tmp_path / "t"), env={"CLANG": "/nonexistent/clang"})
    assert r.returncode != 0
    assert "cannot build the BPF object: clang not found" in r.stderr + r.stdout
