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
