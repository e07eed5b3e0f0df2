"""The C ABI through CMake: configure + build libbsharedrag and its C test, run ctest,
install the package, then build and run a downstream consumer that uses
find_package(bsharedrag) against the installed prefix."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not on PATH")


def _run(cmd, cwd=None, env=None, timeout=300):
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    return proc


def _generator_args():
    # Ninja when available (faster, quieter); CMake's default generator otherwise.
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def test_cmake_build_ctest_install_and_consumer(tmp_path):
    build = tmp_path / "build"
    prefix = tmp_path / "prefix"
    consumer_build = tmp_path / "consumer-build"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")

    _run(["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
          "-DBSHAREDRAG_BUILD_TESTS=ON", *_generator_args()], env=env)
    _run(["cmake", "--build", build, "-j2"], env=env)
    proc = _run(["ctest", "--output-on-failure"], cwd=build, env=env)
    assert "100% tests passed" in proc.stdout, proc.stdout

    _run(["cmake", "--install", build, "--prefix", prefix], env=env)
    assert (prefix / "include" / "bsharedrag.h").is_file()
    configs = list(prefix.glob("lib*/cmake/bsharedrag/bsharedragConfig.cmake"))
    assert configs, f"bsharedragConfig.cmake not installed under {prefix}"
    assert (configs[0].parent / "bsharedragConfigVersion.cmake").is_file()

    _run(["cmake", "-S", ROOT / "tests" / "c" / "consumer", "-B", consumer_build,
          "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix}", *_generator_args()], env=env)
    _run(["cmake", "--build", consumer_build, "-j2"], env=env)
    exe = consumer_build / ("consumer.exe" if os.name == "nt" else "consumer")
    proc = _run([exe], env=env)
    assert "consumer OK" in proc.stdout, proc.stdout


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_sdist_holds_the_sources_tests_and_benchmarks_and_configures(tmp_path):
    """The sdist carries every tracked file its build, its C library and its tests read
    (csrc/, tests/, benchmarks/ scripts, CMakeLists.txt), and `cmake` configures the
    unpacked sdist with the C test on. Built from a copy of the checkout's files: setuptools
    would also add whatever an earlier build's egg-info lists."""
    import sys
    import tarfile

    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout.split()
    tree = tmp_path / "tree"
    for f in files:
        if (ROOT / f).is_file():
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tree / f)
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", tmp_path / "dist"], cwd=tree)
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "src", filter="data")
    needed = [f for f in files if f.startswith(("csrc/", "tests/")) or f in ("CMakeLists.txt", "requirements-cpu.txt")
              or (f.startswith("benchmarks/") and f.endswith((".py", ".sh")))]
    missing = sorted(set(needed) - names)
    assert not missing, f"files missing from the sdist: {missing}"
    (src,) = (tmp_path / "src").iterdir()
    _run(["cmake", "-S", src, "-B", tmp_path / "build", "-DBSHAREDRAG_BUILD_TESTS=ON", *_generator_args()])
