"""Build of the native extension ``tsc_fast._jv``.

CMakeLists.txt is the one description of the native build; this file only hands setuptools' build_ext
over to CMake and tells it where the finished module must land.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        module_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTSC_FAST_MODULE_DIR={module_dir}",
        ]
        if os.environ.get("TSC_FAST_MARCH_NATIVE", "0") == "1":
            configure.append("-DTSC_FAST_MARCH_NATIVE=ON")
        subprocess.run(configure, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("tsc_fast._jv")], cmdclass={"build_ext": CMakeBuild})
