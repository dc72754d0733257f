"""Boot the default guest's kernel as an ELF vmlinux (taken out of its bzImage), not as a bzImage."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.guest


def test_the_same_kernel_boots_from_its_elf_vmlinux(tmp_path):
    from vmmkit.boot.unpack import extract_vmlinux
    from vmmkit.guest import build
    files = build.show()
    with open(files.kernel, "rb") as f:
        bzimage = f.read()
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(extract_vmlinux(bzimage))
    config = tmp_path / "vm.toml"
    config.write_text(f'[machine]\nvcpus = 1\n[boot]\nkernel = "{vmlinux}"\ninitrd = "{files.initrd}"\n')
    proc = subprocess.run([sys.executable, "-m", "vmmkit", "run", str(config), "--exec",
                           "uname -r; head -c 4 /proc/cmdline >/dev/null && echo booted; exit 3"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    assert proc.returncode == 3, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().split() == [files.release, "booted"]
