"""Bundles on instruction sets this host lacks, under QEMU user-mode emulation: two checks.

**A. aarch64.** A bundle's head was trained on *exact* INT8 arithmetic (emulated in float on the
x86 machine that ran ``fit``). An ARM CPU runs the QDQ graph with ONNX Runtime's own integer
kernels (NEON, dot product, I8MM, SVE). Here a real aarch64 build of Python, numpy and ONNX Runtime
runs under ``qemu-aarch64-static`` on several emulated cores, and the device path a user types
(``python -m edgetl.cli predict BUNDLE IMAGES --json``) is compared with the same command on this
host; the backbone's features are compared with exact emulation on x86, and the fused ``model.onnx``
with the numpy head.

**B. An AVX2-only x86 CPU.** QEMU's TCG emulates AVX2 but not AVX-512, so this host's own virtual
environment runs under ``qemu-x86_64-static -cpu Haswell`` on a CPU without VNNI, where ONNX Runtime
and OpenVINO pick their saturating ``vpmaddubsw`` INT8 kernels by CPUID. Bundles with 7-bit weights
should compute their exact numbers there natively; bundles with full 8-bit weights do not, and
edgetl must emulate them (it does when its CPU detection sees no VNNI).

Usage (QEMU from Debian's ``qemu-user-static``; the aarch64 root comes from apt and PyPI and is
cached under ``$EDGETL_CACHE/qemu-arm64-root``, default ``~/.cache/edgetl``)::

    .venv/bin/python benchmarks/emulated_cpus.py                       # fits four bundles first
    .venv/bin/python benchmarks/emulated_cpus.py --bundle arm.bundle --bundle x86.bundle --images DIR

The script is also its own helper inside the emulated machines (``... emulated_cpus.py guest ...``),
so it imports nothing beyond the standard library at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Emulated cores. cortex-a72 is a Raspberry Pi 4 (NEON only, no dot product), cortex-a76 a
# Raspberry Pi 5 (dot product), QEMU's "max" every feature QEMU knows (I8MM, SVE2, SME): the three
# feature sets ONNX Runtime chooses its ARM64 INT8 kernels by (from hwcaps, at run time).
AARCH64_CPUS = ("cortex-a72", "cortex-a76", "max")
# Both lack AVX-512 (QEMU 7.2's TCG emulates none) and VNNI; the second model is there to show a
# result is not one CPU model's quirk.
X86_CPUS = ("Haswell", "Skylake-Client")

GUEST_PYTHON_VERSION = "3.11"
# Debian bookworm's Python 3.11 for arm64 and the libraries its interpreter and the extension
# modules edgetl needs (ssl, zlib, ctypes, bz2, lzma, uuid) link against. Left out on purpose:
# readline, curses, sqlite3, dbm and nis, whose libraries pull in terminfo and Kerberos for
# modules nothing here imports.
ROOT_DEBS = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libssl3",
    "libbz2-1.0",
    "liblzma5",
    "libcrypt1",
    "libuuid1",
)
# The device path's packages (edgetl's base dependencies), pinned to the versions installed on this
# host, so that a difference between the two sides is the instruction set's and not a release's.
DEVICE_PACKAGES = ("onnxruntime", "numpy", "pillow", "onnx", "click", "tqdm", "threadpoolctl", "protobuf")
# glibc 2.36 runs wheels up to manylinux_2_36; numpy and Pillow ship _2_17/_2_28 ones, ORT _2_27/_2_28.
WHEEL_PLATFORMS = (
    "manylinux2014_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux_2_27_aarch64",
    "manylinux_2_28_aarch64",
    "manylinux_2_34_aarch64",
)
ROOT_LAYOUT = 1  # bump when the prepared root's layout changes, so old caches are rebuilt

# Linux arm64 AT_HWCAP / AT_HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h), in bit order. The
# fake /proc/cpuinfo lists what QEMU really advertises to the guest through these.
HWCAP_NAMES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt "
    "fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs "
    "sb paca pacg"
).split()
HWCAP2_NAMES = (
    "dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm "
    "svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme sme_i16i64 "
    "sme_f64f64 sme_i8i32 sme_f16f32 sme_b16f32 sme_f32f32 sme_fa64"
).split()
AT_HWCAP, AT_HWCAP2 = 16, 26
# MIDR fields for the fake cpuinfo (implementer, variant, part, revision), as QEMU 7.2 sets them:
# cpuinfo parsers (ONNX Runtime's, OpenBLAS's) read the core from here, the features from hwcaps.
AARCH64_MIDR = {
    "cortex-a72": (0x41, 0x0, 0xD08, 3),
    "cortex-a76": (0x41, 0x4, 0xD0B, 1),
    "neoverse-n1": (0x41, 0x4, 0xD0C, 1),
    "max": (0x00, 0x0, 0x051, 0),
}
# numpy's CPU-dispatch names -> the Linux /proc/cpuinfo flags edgetl and the runtimes look for.
X86_FLAG_NAMES = {
    "MMX": "mmx",
    "SSE": "sse",
    "SSE2": "sse2",
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "SSE41": "sse4_1",
    "SSE42": "sse4_2",
    "POPCNT": "popcnt",
    "AVX": "avx",
    "F16C": "f16c",
    "FMA3": "fma",
    "AVX2": "avx2",
    "BMI": "bmi1",
    "BMI2": "bmi2",
    "LZCNT": "abm",
    "MOVBE": "movbe",
    "CX16": "cx16",
    "LAHF": "lahf_lm",
    "AVX512F": "avx512f",
    "AVX512CD": "avx512cd",
    "AVX512BW": "avx512bw",
    "AVX512DQ": "avx512dq",
    "AVX512VL": "avx512vl",
    "AVX512VNNI": "avx512_vnni",
    "AVX512BF16": "avx512_bf16",
    "AVX512FP16": "avx512_fp16",
    "AVX512IFMA": "avx512ifma",
    "AVX512VBMI": "avx512vbmi",
    "AVX512VBMI2": "avx512_vbmi2",
    "AVX512BITALG": "avx512_bitalg",
    "AVX512VPOPCNTDQ": "avx512_vpopcntdq",
    "GFNI": "gfni",
    "VAES": "vaes",
    "VPCLMULQDQ": "vpclmulqdq",
}
# QEMU prints one line per TCG-unsupported CPUID bit of the named model, for every thread it starts.
QEMU_NOISE = ("warning: TCG doesn't support requested feature",)


class EmulationUnavailable(RuntimeError):
    """QEMU's user-mode emulators are not installed: these checks cannot run on this machine."""


class EmulationSetupError(RuntimeError):
    """QEMU is here but preparing an emulated machine failed (apt, PyPI, or the guest itself)."""


class GuestCommandError(RuntimeError):
    """A command exited non-zero on a (possibly emulated) machine."""


def log(msg: str) -> None:
    print(f"[emulated-cpus] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ machines
def qemu_binary(arch: str) -> str:
    """Path of ``qemu-ARCH-static``.

    Raises:
        EmulationUnavailable: not installed.
    """
    exe = shutil.which(f"qemu-{arch}-static")
    if not exe:
        raise EmulationUnavailable(
            f"qemu-{arch}-static not found: install Debian's qemu-user-static (apt-get install qemu-user-static)"
        )
    return exe


def qemu_version(arch: str = "aarch64") -> str:
    out = subprocess.run([qemu_binary(arch), "--version"], capture_output=True, text=True).stdout
    return out.split("\n")[0].split("version")[-1].strip() if out else "?"


def default_cache_dir() -> Path:
    """edgetl's cache folder: ``$EDGETL_CACHE``, else ``$XDG_CACHE_HOME/edgetl`` or ``~/.cache/edgetl``."""
    env = os.environ.get("EDGETL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetl"


@dataclass(frozen=True)
class Machine:
    """Where a Python command runs: this host as it is, or a CPU emulated by QEMU user mode.

    ``prefix`` is QEMU's ``-L``: the guest's absolute paths are looked up there first and on the
    host after, which is how the aarch64 guest finds its own libraries and how a guest of either
    architecture reads a ``/proc/cpuinfo`` that describes the emulated CPU instead of this one.
    """

    label: str
    python: str
    qemu: str | None = None
    cpu: str | None = None
    prefix: Path | None = None
    pythonpath: tuple[str, ...] = ()
    unset_env: tuple[str, ...] = ()

    @property
    def emulated(self) -> bool:
        return self.qemu is not None

    def argv(self, args: list[str]) -> list[str]:
        head: list[str] = []
        if self.qemu:
            head = [self.qemu, "-cpu", self.cpu or "max"] + (["-L", str(self.prefix)] if self.prefix else [])
        # -s: no user site-packages; one under $HOME would hold this host's x86 wheels.
        return head + [self.python, "-s", *args]

    def environ(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        for key in ("PYTHONHOME", "PYTHONSTARTUP", *self.unset_env):
            env.pop(key, None)
        env["PYTHONPATH"] = os.pathsep.join(self.pythonpath)
        env.update(extra or {})
        return env

    def run(self, args: list[str], *, env: dict | None = None, timeout: float = 1800, cwd: Path | None = None) -> str:
        """Run ``python ARGS`` here; returns stdout.

        Raises:
            GuestCommandError: non-zero exit (or a crash), with the last line it printed.
        """
        cmd = self.argv([str(a) for a in args])
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=self.environ(env),
                timeout=timeout,
                cwd=str(cwd) if cwd else None,
            )
        except subprocess.TimeoutExpired:
            raise GuestCommandError(f"{self.label}: {_short(args)} ran past {timeout:.0f} s") from None
        if proc.returncode != 0:
            err = [l for l in proc.stderr.splitlines() if l.strip() and not any(n in l for n in QEMU_NOISE)]
            why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
            if proc.returncode in (139, -11):
                why = "segmentation fault"
            raise GuestCommandError(f"{self.label}: {_short(args)} failed ({why}): {err[-1] if err else 'no output'}")
        return proc.stdout


def _short(args: list) -> str:
    args = [str(a) for a in args]
    if args and args[0].endswith("emulated_cpus.py"):
        args = ["emulated_cpus.py", *args[1:]]
    text = " ".join(args[:4])
    return text + (" ..." if len(args) > 4 else "")


def host_int8_kind() -> str:
    """``"VNNI"`` or ``"no VNNI"``: which INT8 kernels this host's runtimes use (labels the tables)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover - not Linux
        return "?"
    return "VNNI" if any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")) else "no VNNI"


def host_machine() -> Machine:
    """This host, running the checkout's edgetl with the interpreter running this script."""
    return Machine("this host (native)", python=sys.executable, pythonpath=(str(REPO / "src"),))


# ------------------------------------------------------------------------------ aarch64 root
@dataclass(frozen=True)
class Aarch64Root:
    """A prepared aarch64 userland: Debian's Python unpacked in ``sysroot``, wheels in ``site``."""

    path: Path

    @property
    def sysroot(self) -> Path:
        return self.path / "sysroot"

    @property
    def site(self) -> Path:
        return self.path / "site"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{GUEST_PYTHON_VERSION}"

    def stamp(self) -> dict:
        try:
            return json.loads((self.path / "ready.json").read_text())
        except (OSError, ValueError):
            return {}


def host_versions(packages=DEVICE_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` on this host (missing ones are left unpinned)."""
    from importlib import metadata

    out = {}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _root_key() -> dict:
    return {
        "layout": ROOT_LAYOUT,
        "python": GUEST_PYTHON_VERSION,
        "debs": list(ROOT_DEBS),
        "wheels": host_versions(),
        "platforms": list(WHEEL_PLATFORMS),
    }


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock file, so two runs (two pytest sessions, a benchmark) never build one root together."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _apt_options(state: Path) -> list[str]:
    # A private apt state (lists, caches, an empty dpkg status) with arm64 as its only architecture:
    # the host's dpkg configuration stays untouched, with no `dpkg --add-architecture arm64` that
    # would make every later `apt-get update` on this machine fetch arm64 indexes too.
    opts = [
        "-o",
        "APT::Architecture=arm64",
        "-o",
        "APT::Architectures=arm64",
        "-o",
        f"Dir::State::Lists={state / 'lists'}",
        "-o",
        f"Dir::Cache={state / 'cache'}",
        "-o",
        "Dir::State::status=/dev/null",
        "-o",
        "Debug::NoLocking=1",
        "-q",
    ]
    if os.geteuid() == 0:
        # apt downloads as user _apt, who cannot write into root's cache folder; stay root.
        opts += ["-o", "APT::Sandbox::User=root"]
    return opts


def _run_setup(cmd: list[str], what: str, *, cwd: Path | None = None, timeout: float = 900) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(cwd) if cwd else None, timeout=timeout)
    except FileNotFoundError:
        raise EmulationSetupError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise EmulationSetupError(f"{what}: no answer within {timeout:.0f} s (is the registry reachable?)") from None
    if proc.returncode != 0:
        lines = [
            l
            for l in (proc.stderr + proc.stdout).splitlines()
            if l.strip() and "is ignored: it is neither a file nor a directory" not in l
        ]
        errs = [l for l in lines if l.startswith(("E:", "ERROR", "error"))] or lines
        raise EmulationSetupError(f"{what} failed: {errs[-1].strip() if errs else f'exit {proc.returncode}'}")
    return proc.stdout


def download_debs(dest: Path, state: Path) -> list[Path]:
    """Debian's arm64 packages of :data:`ROOT_DEBS` into ``dest``, through a private apt state."""
    opts = _apt_options(state)
    for sub in ("lists/partial", "cache/archives/partial"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    _run_setup(["apt-get", *opts, "update"], "apt-get update (arm64 package lists)")
    dest.mkdir(parents=True, exist_ok=True)
    _run_setup(["apt-get", *opts, "download", *ROOT_DEBS], "apt-get download (arm64 Python)", cwd=dest)
    debs = sorted(dest.glob("*.deb"))
    if len(debs) < len(ROOT_DEBS):
        raise EmulationSetupError(f"apt-get download fetched {len(debs)} of {len(ROOT_DEBS)} arm64 packages")
    return debs


def install_wheels(site: Path, versions: dict[str, str]) -> None:
    """The device packages' aarch64 wheels (and their dependencies) into ``site``, never built from source."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--target",
        str(site),
        "--only-binary=:all:",
        "--python-version",
        GUEST_PYTHON_VERSION,
        "--implementation",
        "cp",
    ]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    cmd += [f"{name}=={versions[name]}" if name in versions else name for name in DEVICE_PACKAGES]
    _run_setup(cmd, "pip install (aarch64 wheels)")


def prepare_aarch64_root(cache: Path | None = None, *, force: bool = False) -> Aarch64Root:
    """An aarch64 Python with the device packages, built once under ``CACHE/qemu-arm64-root``.

    Reused while its stamp matches (same Debian package list, same pinned wheel versions, same
    layout); otherwise rebuilt in a sibling folder and swapped in, so an interrupted setup never
    leaves a half-made root behind. About 200 MB; 20-30 s with the registries close by.

    Raises:
        EmulationUnavailable: qemu-aarch64-static is missing.
        EmulationSetupError: apt, pip or the unpacked interpreter failed.
    """
    qemu_binary("aarch64")
    base = Path(cache) if cache else default_cache_dir()
    root = Aarch64Root(base / "qemu-arm64-root")
    key = _root_key()
    with _locked(base / "qemu-arm64-root.lock"):
        if not force and root.stamp().get("key") == key and root.python.is_file():
            return root
        t0 = time.time()
        log(f"preparing the aarch64 root in {root.path} (Debian arm64 debs + PyPI aarch64 wheels)")
        build = Aarch64Root(base / f"qemu-arm64-root.build-{os.getpid()}")
        shutil.rmtree(build.path, ignore_errors=True)
        try:
            debs = download_debs(build.path / "debs", build.path / "apt")
            build.sysroot.mkdir(parents=True)
            for deb in debs:
                _run_setup(["dpkg-deb", "-x", str(deb), str(build.sysroot)], f"dpkg-deb -x {deb.name}")
            shutil.rmtree(build.path / "apt", ignore_errors=True)  # package lists: 20 MB, not needed again
            if not build.python.is_file():
                raise EmulationSetupError(f"the arm64 packages did not provide {build.python.name}")
            install_wheels(build.site, key["wheels"])
            smoke = aarch64_machine("cortex-a76", build)
            try:
                smoke.run(
                    ["-c", "import ssl, zlib, ctypes, bz2, lzma, numpy, onnxruntime, PIL, click, tqdm"], timeout=300
                )
            except GuestCommandError as exc:
                raise EmulationSetupError(f"the prepared aarch64 Python does not work: {exc}") from None
            (build.path / "ready.json").write_text(
                json.dumps(
                    {
                        "key": key,
                        "debs": [d.name for d in debs],
                        "qemu": qemu_version("aarch64"),
                        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    indent=2,
                )
            )
            shutil.rmtree(root.path, ignore_errors=True)
            build.path.rename(root.path)
        finally:
            shutil.rmtree(build.path, ignore_errors=True)
        log(f"aarch64 root ready in {time.time() - t0:.0f} s")
        return root


def read_hwcaps(qemu: str, cpu: str, root: Aarch64Root) -> list[str]:
    """The feature names QEMU advertises (AT_HWCAP, AT_HWCAP2) to a guest on ``-cpu CPU``.

    Runs without a fake cpuinfo: the bare interpreter does not read it, only the runtimes do.
    """
    code = (
        "import ctypes; g = ctypes.CDLL(None).getauxval; g.restype = ctypes.c_ulong; "
        "g.argtypes = [ctypes.c_ulong]; print(g(16), g(26))"
    )
    cmd = [qemu, "-cpu", cpu, "-L", str(root.sysroot), str(root.python), "-s", "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise EmulationSetupError(
            f"qemu-aarch64-static -cpu {cpu}: the guest Python does not start "
            f"({(proc.stderr.strip().splitlines() or ['no output'])[-1]})"
        )
    hw, hw2 = (int(v) for v in proc.stdout.split())
    return decode_hwcaps(hw, hw2)


def decode_hwcaps(hw: int, hw2: int) -> list[str]:
    names = [n for i, n in enumerate(HWCAP_NAMES) if hw >> i & 1]
    return names + [n for i, n in enumerate(HWCAP2_NAMES) if hw2 >> i & 1]


def aarch64_cpuinfo(cpu: str, features: list[str], ncpu: int) -> str:
    """An aarch64 ``/proc/cpuinfo`` for ``ncpu`` cores of ``cpu`` with ``features``.

    QEMU 7.2 hands an aarch64 guest the host's x86 /proc/cpuinfo, and ONNX Runtime's CPU
    detection crashes (segmentation fault in ``import onnxruntime``) on a file without a single
    aarch64 "processor" block, so every aarch64 guest gets this one.
    """
    impl, var, part, rev = AARCH64_MIDR.get(cpu, (0x41, 0x0, 0xD0C, 1))
    blocks = []
    for i in range(ncpu):
        blocks.append(
            "\n".join(
                [
                    f"processor\t: {i}",
                    "BogoMIPS\t: 50.00",
                    f"Features\t: {' '.join(features)}",
                    f"CPU implementer\t: 0x{impl:02x}",
                    "CPU architecture: 8",
                    f"CPU variant\t: 0x{var:x}",
                    f"CPU part\t: 0x{part:03x}",
                    f"CPU revision\t: {rev}",
                ]
            )
        )
    return "\n\n".join(blocks) + "\n"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def aarch64_prefix(root: Aarch64Root, cpu: str) -> Path:
    """``-L`` folder for ``-cpu CPU``: the shared sysroot (links) plus this CPU's own proc/cpuinfo."""
    qemu = qemu_binary("aarch64")
    d = root.path / "cpus" / cpu
    info = d / "proc" / "cpuinfo"
    if not info.is_file():
        (d / "proc").mkdir(parents=True, exist_ok=True)
        for entry in root.sysroot.iterdir():
            link = d / entry.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(os.path.relpath(entry, d))
        tmp = info.with_suffix(".tmp")
        tmp.write_text(aarch64_cpuinfo(cpu, read_hwcaps(qemu, cpu, root), _cpu_count()))
        tmp.replace(info)
    return d


def aarch64_machine(cpu: str, root: Aarch64Root) -> Machine:
    """The aarch64 Python of ``root`` on an emulated ``-cpu CPU``, with the checkout's edgetl."""
    return Machine(
        f"aarch64 {cpu} (QEMU)",
        python=str(root.python),
        qemu=qemu_binary("aarch64"),
        cpu=cpu,
        prefix=aarch64_prefix(root, cpu),
        pythonpath=(str(REPO / "src"), str(root.site)),
        # OPENBLAS_CORETYPE names an x86 core on this host (Haswell); ARM OpenBLAS answers
        # "Core not found" and falls back to generic armv8 instead of the core it would pick on
        # the device, so the guest detects its own.
        unset_env=("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "VIRTUAL_ENV"),
    )


# ------------------------------------------------------------------------------ x86 guests
def x86_cpuinfo(cpu: str, numpy_features: list[str], ncpu: int) -> str:
    """An x86 ``/proc/cpuinfo`` whose flags are what the guest's CPUID says (read by numpy).

    Under qemu-user the guest reads the host's file, whose AVX-512 VNNI flags would make edgetl
    believe the emulated AVX2 CPU accumulates INT8 exactly. numpy has no AVX-VNNI (VEX) name, so
    that flag can never appear here; neither Haswell nor Skylake has it.
    """
    flags = " ".join(
        ["fpu", "tsc", "cmov", "clflush", "fxsr"] + [X86_FLAG_NAMES[f] for f in numpy_features if f in X86_FLAG_NAMES]
    )
    blocks = []
    for i in range(ncpu):
        blocks.append(
            "\n".join(
                [
                    f"processor\t: {i}",
                    "vendor_id\t: GenuineIntel",
                    "cpu family\t: 6",
                    f"model name\t: QEMU TCG {cpu}",
                    "physical id\t: 0",
                    f"siblings\t: {ncpu}",
                    f"core id\t\t: {i}",
                    f"cpu cores\t: {ncpu}",
                    f"flags\t\t: {flags}",
                ]
            )
        )
    return "\n\n".join(blocks) + "\n"


def x86_machine(cpu: str, *, work: Path, fake_cpuinfo: bool = True) -> Machine:
    """This host's own interpreter and packages on an emulated ``-cpu CPU`` (AVX2, no AVX-512).

    With ``fake_cpuinfo`` (the default) the guest reads a /proc/cpuinfo made from the emulated
    CPUID; without it, the host's, which is what a naive run gets (edgetl's detection then sees
    VNNI that the emulated CPU does not have).
    """
    qemu = qemu_binary("x86_64")
    base = Machine(f"x86-64 {cpu} (QEMU)", python=sys.executable, qemu=qemu, cpu=cpu, pythonpath=(str(REPO / "src"),))
    if not fake_cpuinfo:
        return Machine(
            f"x86-64 {cpu} (QEMU, host cpuinfo)", python=sys.executable, qemu=qemu, cpu=cpu, pythonpath=base.pythonpath
        )
    prefix = Path(work) / "x86-prefix" / cpu
    info = prefix / "proc" / "cpuinfo"
    if not info.is_file():
        feats = json.loads(base.run([__file__, "guest", "probe"], timeout=300))["numpy_features"]
        info.parent.mkdir(parents=True, exist_ok=True)
        info.write_text(x86_cpuinfo(cpu, feats, _cpu_count()))
    return Machine(base.label, python=sys.executable, qemu=qemu, cpu=cpu, prefix=prefix, pythonpath=base.pythonpath)


# ------------------------------------------------------------------------------ inside a guest
def _guest_probe(openvino: bool) -> dict:
    """What the interpreter it runs in sees of its CPU (run on every machine, emulated or not)."""
    info: dict = {"machine": platform.machine(), "python": platform.python_version()}
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    info["numpy_features"] = sorted(k for k, v in feats.items() if v)
    with contextlib.suppress(Exception):
        from threadpoolctl import threadpool_info

        info["blas"] = sorted({f"{p['internal_api']}:{p.get('architecture')}" for p in threadpool_info()})
    if platform.machine() == "aarch64":
        g = ctypes.CDLL(None).getauxval
        g.restype, g.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        info["hwcaps"] = decode_hwcaps(g(AT_HWCAP), g(AT_HWCAP2))
    import onnxruntime as ort

    info["onnxruntime"] = ort.__version__
    with contextlib.suppress(ImportError):
        from edgetl.core.sessions import cpu_int8_saturates

        info["edgetl_int8_saturates"] = bool(cpu_int8_saturates())
    if openvino:
        import openvino as ov

        core = ov.Core()
        info["openvino"] = ov.get_version()
        hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
        info["openvino_precision_hint"] = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        info["openvino_capabilities"] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return info


def _guest_run_model(model: str, inputs: str, out: str, *, runtime: str, mode: str) -> dict:
    """Run one model file on a saved input batch with the runtime directly and save its first output.

    ``mode="native"``: the runtime's defaults, i.e. this CPU's INT8 kernels. ``mode="exact"``: INT8
    arithmetic emulated in float, as edgetl's fit does (ONNX Runtime without graph optimizations,
    so QuantizeLinear/DequantizeLinear run as ops around float convolutions; OpenVINO with its
    low-precision transformations off). OpenVINO's float precision is pinned to f32 in both modes:
    its default on a bf16-capable CPU (this host) is bf16, which would mix a float-precision effect
    into a comparison of INT8 kernels (the default is read and shown by ``probe``).
    """
    import numpy as np

    x = np.load(inputs)
    t0 = time.time()
    meta: dict = {"runtime": runtime, "mode": mode}
    if runtime == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if mode == "exact":
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # ORT's opt-in bf16 GEMMs on ARM64: off (its default), said explicitly since it would change numbers.
        opts.add_session_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16", "0")
        sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        run = lambda chunk: sess.run(None, {inp.name: chunk})[0]  # noqa: E731
        meta["version"] = ort.__version__
    elif runtime == "openvino":
        import openvino as ov

        config: dict = {"INFERENCE_PRECISION_HINT": "f32"}
        if mode == "exact":
            config["LP_TRANSFORMS_MODE"] = False
        compiled = ov.Core().compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        ps = compiled.inputs[0].get_partial_shape()
        batch = ps[0].get_length() if ps[0].is_static else None
        run = lambda chunk: np.asarray(request.infer({0: chunk})[compiled.outputs[0]]).copy()  # noqa: E731
        meta["version"] = ov.get_version()
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        meta["precision"] = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    else:
        raise SystemExit(f"unknown runtime {runtime}")
    meta["load_s"] = round(time.time() - t0, 2)
    t1 = time.time()
    step = batch or len(x)
    parts = []
    for s in range(0, len(x), step):
        chunk = x[s : s + step]
        real = len(chunk)
        if batch and real < batch:  # a static batch: pad, drop the padded rows' outputs
            chunk = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:], chunk.dtype)])
        parts.append(run(np.ascontiguousarray(chunk))[:real])
    y = np.concatenate(parts).reshape(len(x), -1).astype(np.float32)
    meta["run_s"] = round(time.time() - t1, 2)
    np.save(out, y)
    return meta


def guest_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="emulated_cpus.py guest")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--openvino", action="store_true")
    r = sub.add_parser("run-model")
    r.add_argument("model")
    r.add_argument("inputs")
    r.add_argument("out")
    r.add_argument("--runtime", default="onnxruntime")
    r.add_argument("--mode", choices=("native", "exact"), default="native")
    a = ap.parse_args(argv)
    if a.cmd == "probe":
        print(json.dumps(_guest_probe(a.openvino)))
    else:
        print(json.dumps(_guest_run_model(a.model, a.inputs, a.out, runtime=a.runtime, mode=a.mode)))


# ------------------------------------------------------------------------------ host side
def probe(machine: Machine, *, openvino: bool = False) -> dict:
    """What ``machine`` sees of its CPU: numpy's dispatch features, OpenBLAS core, hwcaps (aarch64),
    edgetl's INT8 saturation detection, and (``openvino``) OpenVINO's default float precision."""
    return json.loads(machine.run([__file__, "guest", "probe", *(["--openvino"] if openvino else [])], timeout=600))


def pick_images(folder: str | Path, count: int) -> list[Path]:
    """Up to ``count`` images from ``folder``, taken round-robin over its class folders (sorted)."""
    folder = Path(folder)
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
    groups = [
        sorted(p for p in d.rglob("*") if p.suffix.lower() in exts) for d in sorted(folder.iterdir()) if d.is_dir()
    ]
    groups = [g for g in groups if g] or [sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts)]
    out: list[Path] = []
    i = 0
    while len(out) < count and any(i < len(g) for g in groups):
        out += [g[i] for g in groups if i < len(g)][: count - len(out)]
        i += 1
    if not out:
        raise ValueError(f"{folder}: no images")
    return out


def bundle_info(bundle: str | Path) -> dict:
    """The few manifest fields the checks need (read directly: no edgetl import)."""
    m = json.loads((Path(bundle) / "manifest.json").read_text())
    t = m.get("target", {})
    fix = (t.get("quantization") or {}).get("overflow_fix")
    bits = {"enable": "7-bit w", "first_layer": "8-bit w", "disable": "8-bit w"}.get(fix, "?")
    return {
        "path": Path(bundle),
        "target": t.get("name", "?"),
        "runtime": m.get("runtime"),
        "labels": m["labels"],
        "backbone": Path(bundle) / m["models"]["backbone"],
        "fused": Path(bundle) / m["models"]["fused"],
        "fit_features": t.get("fit_features", "runtime"),
        "weights": bits,
        "val_data": Path(m.get("training", {}).get("data", "")) / "val",
    }


def make_inputs(bundle: str | Path, images: list[Path], out: Path) -> Path:
    """The backbone's input batch for ``images``, preprocessed on this host with edgetl's own code,
    so that the feature comparisons see only the runtimes' differences."""
    import numpy as np

    from edgetl.core.bundle import load_bundle
    from edgetl.core.features import load_input

    pre = load_bundle(bundle).preprocess
    np.save(out, np.stack([load_input(Path(p), pre) for p in images]).astype(np.float32))
    return out


def run_model(machine: Machine, model: Path, inputs: Path, work: Path, *, runtime: str, mode: str):
    """``model``'s first output on ``machine`` for the saved ``inputs`` (see :func:`_guest_run_model`).

    Returns ``(outputs, meta)``; ``meta`` has the runtime version and load/run seconds.
    """
    import numpy as np

    out = Path(tempfile.mkstemp(suffix=".npy", dir=work)[1])
    meta = json.loads(
        machine.run(
            [__file__, "guest", "run-model", model, inputs, out, "--runtime", runtime, "--mode", mode], cwd=work
        )
        .strip()
        .splitlines()[-1]
    )
    y = np.load(out)
    out.unlink()
    return y, meta


def predict(
    machine: Machine, bundle: str | Path, images: list[Path], *, env: dict | None = None, work: Path | None = None
):
    """``python -m edgetl.cli predict BUNDLE IMAGES --json`` on ``machine``: the device path.

    Returns ``(probs, seconds)``: probabilities of every label (bundle label order) per image, in
    the order of ``images``.
    """
    import numpy as np

    labels = bundle_info(bundle)["labels"]
    t0 = time.time()
    out = machine.run(
        ["-m", "edgetl.cli", "predict", bundle, *images, "--json", "--quiet", "--top-k", len(labels)], env=env, cwd=work
    )
    seconds = time.time() - t0
    index = {l: i for i, l in enumerate(labels)}
    rows = {}
    for p in json.loads(out)["predictions"]:
        v = np.zeros(len(labels))
        for e in p["top_k"]:
            v[index[e["label"]]] = e["p"]
        rows[os.path.realpath(p["path"])] = v
    missing = [str(p) for p in images if os.path.realpath(p) not in rows]
    if missing:
        raise GuestCommandError(f"{machine.label}: predict gave no answer for {missing[0]}")
    return np.stack([rows[os.path.realpath(p)] for p in images]), seconds


def compare_probs(a, b, *, margin: float = 0.0) -> dict:
    """Top-1 agreement and the largest probability difference of two (images, labels) arrays; with
    ``margin``, also the agreement on the images whose top two in ``b`` are further apart than it
    (``clear``: a difference of at most margin / 2 per probability cannot reorder those)."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    top2 = np.sort(b, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > margin
    same = a.argmax(1) == b.argmax(1)
    return {
        "n": len(a),
        "top1_agreement": float(np.mean(same)),
        "max_prob_diff": float(np.abs(a - b).max()),
        "clear": int(clear.sum()),
        "clear_top1_agreement": float(np.mean(same[clear])) if clear.any() else None,
    }


def feature_cosine(a, b) -> dict:
    """Per-image cosine of two feature arrays (mean and worst) and their largest absolute difference."""
    import numpy as np

    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {
        "n": len(a),
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "max_abs_diff": float(np.abs(a - b).max()),
    }


def head_probs(bundle: str | Path, features):
    """The bundle's numpy head (the code ``predict`` runs) on ``features``, on this host."""
    from edgetl import load_predictor

    return load_predictor(bundle).head.proba(features)


# ------------------------------------------------------------------------------ the checks
def _row(bundle: dict, machine: str, compared: str, **figures) -> dict:
    return {"bundle": f"{bundle['target']} ({bundle['weights']})", "machine": machine, "compared": compared, **figures}


def check_aarch64(
    bundles: list[str | Path], images: list[Path], *, root: Aarch64Root, cpus=AARCH64_CPUS, work: Path
) -> dict:
    """Check A: ONNX Runtime bundles on emulated aarch64 cores against this x86 host.

    Per bundle and core: ``edgetl predict`` top-1 agreement and max probability difference vs the
    same command here (this host's path, and exact emulation forced), backbone feature cosine of
    aarch64 ORT (its own kernels, and unfused) vs exact emulation here, and the fused model.onnx
    vs the numpy head on the aarch64 features. Returns ``{"rows": [...], "cpus": {cpu: probe}}``.
    """
    host = host_machine()
    kind = host_int8_kind()
    rows: list[dict] = []
    cpu_info = {}
    machines = {cpu: aarch64_machine(cpu, root) for cpu in cpus}
    for cpu, m in machines.items():
        cpu_info[cpu] = probe(m)
    for path in bundles:
        b = bundle_info(path)
        if b["runtime"] != "onnxruntime":
            continue
        inputs = make_inputs(path, images, work / f"{b['target']}-inputs.npy")
        x86_exact, _ = run_model(host, b["backbone"], inputs, work, runtime="onnxruntime", mode="exact")
        x86_native, _ = run_model(host, b["backbone"], inputs, work, runtime="onnxruntime", mode="native")
        x86_pred, _ = predict(host, path, images, work=work)
        x86_pred_exact, _ = predict(host, path, images, env={"EDGETL_EXACT_INT8": "1"}, work=work)
        rows.append(
            _row(
                b,
                "x86 host",
                f"features: ORT native ({kind}) vs exact emulation",
                **feature_cosine(x86_native, x86_exact),
            )
        )
        rows.append(
            _row(
                b,
                "x86 host",
                f"predict: this host's own path ({kind}) vs exact forced",
                **compare_probs(x86_pred, x86_pred_exact),
            )
        )
        for cpu, m in machines.items():
            t0 = time.time()
            pred, pred_s = predict(m, path, images, work=work)
            rows.append(_row(b, cpu, "predict: aarch64 vs x86 host", **compare_probs(pred, x86_pred), seconds=pred_s))
            rows.append(_row(b, cpu, "predict: aarch64 vs x86 exact forced", **compare_probs(pred, x86_pred_exact)))
            native, meta = run_model(m, b["backbone"], inputs, work, runtime="onnxruntime", mode="native")
            rows.append(
                _row(
                    b,
                    cpu,
                    "features: aarch64 ORT native vs x86 exact",
                    **feature_cosine(native, x86_exact),
                    seconds=meta["load_s"] + meta["run_s"],
                )
            )
            rows.append(
                _row(
                    b,
                    cpu,
                    f"features: aarch64 ORT native vs x86 ORT native ({kind})",
                    **feature_cosine(native, x86_native),
                )
            )
            unfused, meta = run_model(m, b["backbone"], inputs, work, runtime="onnxruntime", mode="exact")
            rows.append(
                _row(
                    b,
                    cpu,
                    "features: aarch64 unfused (exact) vs x86 exact",
                    **feature_cosine(unfused, x86_exact),
                    seconds=meta["load_s"] + meta["run_s"],
                )
            )
            fused, meta = run_model(m, b["fused"], inputs, work, runtime="onnxruntime", mode="native")
            rows.append(
                _row(
                    b,
                    cpu,
                    "model.onnx (aarch64) vs numpy head on aarch64 features",
                    **compare_probs(fused, head_probs(path, native)),
                    seconds=meta["load_s"] + meta["run_s"],
                )
            )
            log(f"A: {b['target']} on {cpu}: {time.time() - t0:.0f} s")
    return {"rows": rows, "cpus": cpu_info}


def check_avx2(
    bundles: list[str | Path],
    images: list[Path],
    *,
    cpus=X86_CPUS,
    work: Path,
    exact_on_guest: bool = True,
    naive_detection: bool = True,
) -> dict:
    """Check B: bundles on an emulated AVX2-only x86 CPU (no AVX-512, no VNNI) against this host.

    Per bundle and CPU: backbone feature cosine of the AVX2 CPU's own kernels vs exact emulation
    and vs this host's own kernels; (``exact_on_guest``) exact emulation on the AVX2 CPU vs here;
    ``edgetl predict`` there (with a /proc/cpuinfo of the emulated CPU) vs here; and
    (``naive_detection``) for bundles edgetl must emulate, predict with the host's cpuinfo visible,
    i.e. what happens when the detection is fooled. Also each machine's OpenVINO default precision.
    Returns ``{"rows": [...], "cpus": {label: probe}}``.
    """
    host = host_machine()
    kind = host_int8_kind()
    rows: list[dict] = []
    machines = {cpu: x86_machine(cpu, work=work) for cpu in cpus}
    cpu_info = {"host": probe(host, openvino=True)}
    for cpu, m in machines.items():
        cpu_info[cpu] = probe(m, openvino=True)
    for path in bundles:
        b = bundle_info(path)
        rt = b["runtime"]
        inputs = make_inputs(path, images, work / f"{b['target']}-inputs.npy")
        host_exact, _ = run_model(host, b["backbone"], inputs, work, runtime=rt, mode="exact")
        host_native, _ = run_model(host, b["backbone"], inputs, work, runtime=rt, mode="native")
        host_pred, _ = predict(host, path, images, work=work)
        simulated = b["fit_features"] == "simulated"
        host_pred_exact = (
            predict(host, path, images, env={"EDGETL_EXACT_INT8": "1"}, work=work)[0] if simulated else None
        )
        rows.append(
            _row(b, "x86 host", f"features: host native ({kind}) vs exact", **feature_cosine(host_native, host_exact))
        )
        for cpu, m in machines.items():
            t0 = time.time()
            native, meta = run_model(m, b["backbone"], inputs, work, runtime=rt, mode="native")
            rows.append(
                _row(
                    b,
                    cpu,
                    "features: AVX2 native vs exact (host)",
                    **feature_cosine(native, host_exact),
                    seconds=meta["load_s"] + meta["run_s"],
                )
            )
            rows.append(
                _row(b, cpu, f"features: AVX2 native vs host native ({kind})", **feature_cosine(native, host_native))
            )
            if exact_on_guest:
                ex, meta = run_model(m, b["backbone"], inputs, work, runtime=rt, mode="exact")
                rows.append(
                    _row(
                        b,
                        cpu,
                        "features: AVX2 exact vs exact (host)",
                        **feature_cosine(ex, host_exact),
                        seconds=meta["load_s"] + meta["run_s"],
                    )
                )
            pred, pred_s = predict(m, path, images, work=work)
            rows.append(
                _row(b, cpu, "predict: AVX2 (its cpuinfo) vs host", **compare_probs(pred, host_pred), seconds=pred_s)
            )
            if simulated:
                rows.append(
                    _row(
                        b,
                        cpu,
                        "predict: AVX2 (its cpuinfo) vs host exact forced",
                        **compare_probs(pred, host_pred_exact),
                    )
                )
            if naive_detection and simulated:
                naive = x86_machine(cpu, work=work, fake_cpuinfo=False)
                pred, pred_s = predict(naive, path, images, work=work)
                rows.append(
                    _row(
                        b,
                        cpu,
                        "predict: AVX2 with host cpuinfo (fooled) vs host",
                        **compare_probs(pred, host_pred),
                        seconds=pred_s,
                    )
                )
            log(f"B: {b['target']} on {cpu}: {time.time() - t0:.0f} s")
    return {"rows": rows, "cpus": cpu_info}


# ------------------------------------------------------------------------------ printing
def _fmt(v, key: str) -> str:
    if v is None:
        return ""
    if key == "top1_agreement":
        return f"{100 * v:.1f}%"
    if key in ("cos_mean", "cos_min"):
        return f"{v:.6f}"
    if key in ("max_prob_diff", "max_abs_diff"):
        return f"{v:.2e}" if v else "0"
    if key == "seconds":
        return f"{v:.1f}"
    return str(v)


COLUMNS = (
    ("bundle", "bundle"),
    ("machine", "machine"),
    ("compared", "what is compared"),
    ("n", "n"),
    ("top1_agreement", "top-1"),
    ("max_prob_diff", "max|dp|"),
    ("cos_mean", "cos mean"),
    ("cos_min", "cos min"),
    ("max_abs_diff", "max|df|"),
    ("seconds", "s"),
)


def format_table(title: str, rows: list[dict], columns=COLUMNS) -> str:
    cols = [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]
    cells = [[h for _, h in cols]] + [[_fmt(r.get(k), k) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(lines)


def describe_cpus(info: dict) -> list[dict]:
    """One row per machine: the ISA facts that decide INT8 and float kernels there."""
    rows = []
    for name, p in info.items():
        if "hwcaps" in p:
            interesting = [f for f in ("asimddp", "i8mm", "svei8mm", "sve", "sve2", "bf16", "sme") if f in p["hwcaps"]]
            isa = "NEON " + " ".join(interesting)
        else:
            keys = set(p["numpy_features"])
            isa = " ".join(k for k in ("AVX2", "AVX512F", "AVX512VNNI", "AVX512BF16") if k in keys)
        rows.append(
            {
                "machine": name,
                "isa": isa,
                "blas": ",".join(p.get("blas", [])),
                "saturates": p.get("edgetl_int8_saturates"),
                "ov_hint": p.get("openvino_precision_hint"),
            }
        )
    return rows


def fit_bundles(work: Path, targets: list[str], *, calibration: int = 64) -> tuple[list[Path], Path]:
    """The surfaces example and one bundle per target in ``work``, through the CLI a user types."""
    data = work / "surfaces"
    cli = [sys.executable, "-m", "edgetl.cli"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    if not (data / "val").is_dir():
        subprocess.run(cli + ["example", "surfaces", str(data)], check=True, env=env, stdout=subprocess.DEVNULL)
    out = []
    for t in targets:
        b = work / f"{t}.bundle"
        if not (b / "manifest.json").is_file():
            log(f"fitting {t} (1-3 minutes on 2 cores)")
            subprocess.run(
                cli
                + [
                    "fit",
                    str(data),
                    "--out",
                    str(b),
                    "--target",
                    t,
                    "--calibration-size",
                    str(calibration),
                    "--allow-drop",
                    "--cache",
                    str(work / "cache"),
                    "--force",
                    "--quiet",
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
        out.append(b)
    return out, data / "val"


def main(argv: list[str] | None = None) -> int:
    import _provenance  # here, not at the top: tests load this file as a module from elsewhere

    _provenance.stamp()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["guest"]:
        guest_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", default=[], help="bundle to check (repeat); default: fit four")
    ap.add_argument("--images", help="folder of images (default: the first bundle's validation folder)")
    ap.add_argument("--count", type=int, default=24, help="images per check (spread over classes)")
    ap.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "edgetl-emulated-cpus"),
        help="folder for fitted bundles and intermediate files",
    )
    ap.add_argument("--cache", help="where the aarch64 root is kept (default $EDGETL_CACHE or ~/.cache/edgetl)")
    ap.add_argument("--targets", default="cpu-arm64,cpu-x86,openvino-cpu,intel-npu", help="profiles to fit")
    ap.add_argument("--arm-cpu", action="append", help=f"QEMU aarch64 -cpu (repeat; default {', '.join(AARCH64_CPUS)})")
    ap.add_argument("--x86-cpu", action="append", help=f"QEMU x86-64 -cpu (repeat; default {', '.join(X86_CPUS)})")
    ap.add_argument("--skip-arm", action="store_true")
    ap.add_argument("--skip-avx2", action="store_true")
    ap.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"qemu": None}
    try:
        results["qemu"] = qemu_version("aarch64" if not a.skip_arm else "x86_64")
        if a.bundle:
            bundles = [Path(b) for b in a.bundle]
            images_dir = Path(a.images) if a.images else bundle_info(bundles[0])["val_data"]
        else:
            bundles, images_dir = fit_bundles(work, [t for t in a.targets.split(",") if t])
            images_dir = Path(a.images) if a.images else images_dir
        images = pick_images(images_dir, a.count)
        print(
            f"QEMU {results['qemu']}; {len(images)} images from {images_dir}; "
            f"host: {platform.processor() or platform.machine()}"
        )
        if not a.skip_arm:
            t0 = time.time()
            root = prepare_aarch64_root(Path(a.cache) if a.cache else None)
            res = check_aarch64(bundles, images, root=root, cpus=tuple(a.arm_cpu or AARCH64_CPUS), work=work)
            results["aarch64"] = res
            print()
            print(
                format_table(
                    "Emulated aarch64 cores (hwcaps QEMU advertises; OpenBLAS core numpy uses)",
                    describe_cpus(res["cpus"]),
                    (("machine", "cpu"), ("isa", "features"), ("blas", "BLAS")),
                )
            )
            print()
            print(format_table(f"A. aarch64 ONNX Runtime vs this x86 host ({time.time() - t0:.0f} s)", res["rows"]))
        if not a.skip_avx2:
            t0 = time.time()
            res = check_avx2(bundles, images, cpus=tuple(a.x86_cpu or X86_CPUS), work=work)
            results["avx2"] = res
            print()
            print(
                format_table(
                    "x86 machines (numpy's CPUID view; edgetl's INT8 detection; OpenVINO default precision)",
                    describe_cpus(res["cpus"]),
                    (
                        ("machine", "machine"),
                        ("isa", "ISA"),
                        ("saturates", "edgetl: int8 saturates"),
                        ("ov_hint", "OpenVINO INFERENCE_PRECISION_HINT"),
                    ),
                )
            )
            print()
            print(format_table(f"B. emulated AVX2-only x86 vs this host ({time.time() - t0:.0f} s)", res["rows"]))
    except (EmulationUnavailable, EmulationSetupError, GuestCommandError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(map(str, exc.cmd[:4]))} ... failed (exit {exc.returncode})", file=sys.stderr)
        return 2
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
