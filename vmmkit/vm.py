"""Building and running a VM from a VmSpec: the one path for TOML files and Python programs.

A Vm owns the KVM VM, guest memory, the PIO and MMIO buses and the vCPU
threads. Devices come from plugins (platform devices through
``vmmkit_vm_setup_platform``, virtio devices through their kinds); the core
knows none of them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from . import exitcodes, threads
from ._native import lib
from .boot import acpi, layout
from .boot.bootparams import build_boot_params, place_initrd
from .boot.e820 import build_e820
from .boot.kernel import BootError, check_kernel_fits, load_kernel_file
from .boot.x86 import boot_segments, cmdline_bytes, initial_regs, initial_sregs
from .bus import Bus
from .config import VmSpec
from .errors import VmmkitError
from .kvm import Kvm, KvmError
from .kvm.cpuid import vcpu_cpuid
from .kvm.vcpu import MISC_ENABLE_FAST_STRING, MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK
from .kvm.vm import EventFd
from .memory import GuestMemory
from .plugins import Plugins, PluginError
from .virtio.constants import MMIO_WINDOW
from .virtio.mmio import VirtioMmioTransport

KICK_SIGNAL = signal.SIGUSR1
# Arguments vmmkit always gives the kernel: the console on COM1, no PCI to probe,
# no port-0x80 delays (each would be an exit), reboot through the ACPI reset register.
BASE_CMDLINE = "console=ttyS0 reboot=a panic=-1 pci=off io_delay=none"
EXEC_CMDLINE = "quiet"
# IOAPIC inputs for virtio-MMIO transports: every pin from 5 up that no
# platform device (PIT 0, cascade 2, COM1 4, the ACPI GED 9) owns.
VIRTIO_GSIS = (5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)


class IrqLine:
    """An edge-triggered guest interrupt line backed by an irqfd: trigger() needs no ioctl."""

    def __init__(self, kvm_vm, gsi: int):
        self.gsi = gsi
        self.event = EventFd()
        kvm_vm.irqfd(self.event.fd, gsi)

    def trigger(self) -> None:
        """Inject one interrupt edge."""
        self.event.signal()


class Vm:
    """A virtual machine built from a VmSpec.

    ``exec_command``: run this in the default guest's /init and report its
    status (the ``--exec`` of ``vmmkit run``). ``console``: where the serial
    console's bytes go when ``[serial] output = "stdout"`` (a binary file
    object; default stdout).
    """

    def __init__(self, spec: VmSpec, *, plugins: Plugins | None = None, exec_command: str | None = None,
                 console=None, progress=None):
        self.spec = spec
        self.plugins = plugins or Plugins(disable=spec.plugins.disable)
        self.exec_command = exec_command
        self.console_file = console or sys.stdout.buffer
        self.progress = progress or (lambda msg: print(f"vmmkit: {msg}", file=sys.stderr, flush=True))
        self.stop_event = threading.Event()
        self.stop_reason: str | None = None
        self.stop_detail: str = ""
        self.exec_stream = None
        self.irq_lines: dict[int, IrqLine] = {}
        self.mmio_devices: list[acpi.MmioDeviceDesc] = []
        self.virtio_transports: list[VirtioMmioTransport] = []
        self.devices: dict = {}
        self.vcpus = []
        self._vcpu_threads = []
        self._built = False
        # Every thread vmmkit starts from now on tells the plugins (seccomp installs its filter there).
        threads.add_thread_start_callback(self._thread_started)

    def _thread_started(self, role: str, name: str) -> None:
        self.plugins.call("vmmkit_thread_start", role=role, name=name)

    # ----- what plugins use -----
    def add_pio_device(self, name: str, device, base: int, size: int) -> None:
        """Put a device on the port I/O bus."""
        self.pio_bus.insert(device, base, size, name)

    def add_mmio_device(self, name: str, device, base: int, size: int) -> None:
        """Put a device on the MMIO bus."""
        self.mmio_bus.insert(device, base, size, name)

    def add_virtio_device(self, device) -> VirtioMmioTransport:
        """Put a :class:`~vmmkit.virtio.VirtioDevice` on its own virtio-MMIO window and GSI.

        The window and interrupt are listed in the ACPI DSDT, so the guest
        finds the device without command-line help; queue kicks are wired as
        ioeventfds and interrupts as irqfds.
        """
        index = len(self.virtio_transports)
        if index >= len(VIRTIO_GSIS):
            raise VmmkitError(f"too many virtio devices: at most {len(VIRTIO_GSIS)}")
        base, gsi = layout.virtio_mmio_addr(index), VIRTIO_GSIS[index]
        transport = VirtioMmioTransport(device, self.memory, self.irq_line(gsi).trigger, kvm_vm=self.kvm_vm, base=base)
        self.add_mmio_device(f"virtio-{device.name}", transport, base, MMIO_WINDOW)
        self.mmio_devices.append(acpi.MmioDeviceDesc(base, MMIO_WINDOW, gsi))
        self.virtio_transports.append(transport)
        return transport

    def irq_line(self, gsi: int) -> IrqLine:
        """The edge-triggered interrupt line *gsi* (one irqfd, shared by callers)."""
        if gsi not in self.irq_lines:
            self.irq_lines[gsi] = IrqLine(self.kvm_vm, gsi)
        return self.irq_lines[gsi]

    def console_writer(self):
        """A callable taking console bytes: straight to the console, or filtered for --exec."""
        if self.exec_command is None:
            fd = self.console_file.fileno() if hasattr(self.console_file, "fileno") else None
            if fd is not None:
                return lambda data: os.write(fd, data)
            return lambda data: (self.console_file.write(data), self.console_file.flush())
        from .guest.execcmd import exec_stream
        self.exec_stream = exec_stream(self.console_file)
        stream = self.exec_stream

        def write(data: bytes) -> None:
            stream.feed(data)
            if stream.status is not None and self.stop_reason is None:
                # The command has finished and said so: no need to wait for the power-off.
                self.request_stop("exec-done")
        return write

    def request_stop(self, reason: str, detail: str = "") -> None:
        """Stop the VM ("poweroff", "reboot", "error", "signal", "exec-done"); the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = reason, detail
        self.stop_event.set()
        for vcpu in self.vcpus:
            vcpu.request_exit()
        for t in self._vcpu_threads:
            if t.ident is not None and t.is_alive() and t is not threading.current_thread():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    # ----- building -----
    def build(self) -> "Vm":
        """Create the KVM VM, memory, devices and vCPUs; load the kernel. Nothing runs yet."""
        spec = self.spec
        # What the user can get wrong is checked before KVM is opened, so a
        # bad kernel path or an impossible memory size is reported as such on any host.
        self.kernel_path, self.initrd_path = self._guest_files()
        self.image = load_kernel_file(self.kernel_path)
        self.memory = GuestMemory.create(spec.machine.memory)
        self.kvm = Kvm()
        if spec.machine.vcpus > self.kvm.max_vcpus():
            raise VmmkitError(f"[machine] vcpus = {spec.machine.vcpus}: this host's KVM allows at most {self.kvm.max_vcpus()}")
        self.kvm_vm = self.kvm.create_vm()
        self.kvm_vm.setup_x86()
        self.memory.register(self.kvm_vm)
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.plugins.call("vmmkit_vm_setup_platform", vm=self)
        self._create_devices()
        self._load_guest()
        supported = self.kvm.supported_cpuid()
        for index in range(spec.machine.vcpus):
            vcpu = self.kvm_vm.create_vcpu(index)
            vcpu.set_cpuid(vcpu_cpuid(supported, index, spec.machine.vcpus))
            vcpu.set_msrs({MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING, MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WRITEBACK})
            vcpu.setup_fpu()
            vcpu.setup_lapic_lint()
            if index == 0:
                # Only the boot CPU starts in the kernel; the others wait for INIT/SIPI.
                vcpu.set_sregs(initial_sregs())
                vcpu.set_regs(initial_regs(self.entry64))
            self.vcpus.append(vcpu)
        self._built = True
        self.plugins.call("vmmkit_vm_built", vm=self)
        return self

    def _create_devices(self) -> None:
        for dspec in self.spec.devices:
            kind = self.plugins.kinds.get(dspec.kind)
            if kind is None:
                raise PluginError(f"device {dspec.id!r}: no plugin provides kind {dspec.kind!r}")
            self.devices[dspec.id] = kind.create(self, dspec)

    def _guest_files(self) -> tuple[str, str | None]:
        boot = self.spec.boot
        if boot.kernel:
            return boot.kernel, boot.initrd
        from .guest import build as guest_build
        files = guest_build.show()
        if not files.built:
            self.progress("no [boot] kernel given and the default guest is not built yet: building it now")
            files = guest_build.build(progress=self.progress)
        return files.kernel, boot.initrd or files.initrd

    def kernel_cmdline(self) -> str:
        """The full kernel command line: vmmkit's arguments, the TOML's, then the --exec command."""
        parts = [BASE_CMDLINE]
        if self.exec_command is not None:
            parts.append(EXEC_CMDLINE)
        if self.spec.boot.mmio_cmdline:
            for d in self.mmio_devices:
                parts.append(f"virtio_mmio.device={d.size:#x}@{d.base:#x}:{d.gsi}")
        if self.spec.boot.cmdline:
            parts.append(self.spec.boot.cmdline)
        if self.exec_command is not None:
            from .guest.execcmd import exec_param
            parts.append(exec_param(self.exec_command))
        return " ".join(parts)

    def _load_guest(self) -> None:
        kernel_path, initrd_path, image = self.kernel_path, self.initrd_path, self.image
        mem = self.spec.machine.memory
        for gpa, data in boot_segments():
            self.memory.write(gpa, data)
        for gpa, data in image.segments:
            self._write_checked(gpa, data, kernel_path)
        cmdline = cmdline_bytes(self.kernel_cmdline(), image.cmdline_size)
        self.memory.write(layout.CMDLINE_ADDR, cmdline)
        initrd_gpa = initrd_size = 0
        if initrd_path:
            try:
                with open(initrd_path, "rb") as f:
                    initrd = f.read()
            except OSError as exc:
                raise BootError(f"{initrd_path}: cannot read the initrd: {exc.strerror}") from None
            initrd_size = len(initrd)
            initrd_gpa = place_initrd(image, mem, initrd_size, path=initrd_path)
            self.memory.write(initrd_gpa, initrd)
        else:
            check_kernel_fits(image, mem, path=kernel_path)
        tables = acpi.build_acpi_tables(self.spec.machine.vcpus, self.mmio_devices)
        self.memory.write(tables.gpa, tables.blob)
        params = build_boot_params(image, cmdline_gpa=layout.CMDLINE_ADDR, cmdline_size=len(cmdline),
                                   initrd_gpa=initrd_gpa, initrd_size=initrd_size, e820=build_e820(mem),
                                   rsdp_gpa=tables.rsdp_gpa)
        self.memory.write(layout.BOOT_PARAMS_ADDR, params)
        self.entry64 = image.entry64

    def _write_checked(self, gpa: int, data: bytes, path: str) -> None:
        if not self.memory.is_ram(gpa, len(data)):
            raise BootError(f"{path}: the kernel does not fit in {self.spec.machine.memory >> 20} MiB of guest memory")
        self.memory.write(gpa, data)

    # ----- running -----
    def run(self) -> int:
        """Run until the guest stops; return vmmkit's exit status (see vmmkit.exitcodes)."""
        if not self._built:
            self.build()
        if threading.current_thread() is threading.main_thread():
            # The kick signal must interrupt KVM_RUN, so it needs a handler (not SIG_IGN/SIG_DFL).
            signal.signal(KICK_SIGNAL, lambda *_: None)
        for vcpu in self.vcpus:
            t = threads.start_thread(threads.ROLE_VCPU, f"vcpu{vcpu.index}", self._vcpu_loop, vcpu)
            self._vcpu_threads.append(t)
        self.plugins.call("vmmkit_vm_started", vm=self)
        try:
            while not self.stop_event.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.request_stop("signal", "interrupted")
        for t in self._vcpu_threads:
            t.join(timeout=5)
        for transport in self.virtio_transports:
            transport.device.reset()  # workers stop before the memory they use goes away
        self.plugins.call("vmmkit_vm_stopping", vm=self, reason=self.stop_reason)
        return self._exit_status()

    def _exit_status(self) -> int:
        reason = self.stop_reason
        if self.exec_stream is not None:
            self.exec_stream.close()
            if self.exec_stream.status is not None:
                return self.exec_stream.status
            if reason == "error":
                print(f"vmmkit: error: {self.stop_detail}", file=sys.stderr)
            tail = bytes(self.exec_stream.log[-2000:]).decode(errors="replace")
            print(f"vmmkit: the guest stopped ({reason}) before the command reported its status; "
                  f"console tail:\n{tail}", file=sys.stderr)
            return exitcodes.NO_STATUS
        if reason == "poweroff":
            return exitcodes.POWEROFF
        if reason == "reboot":
            return exitcodes.REBOOT
        if reason == "signal":
            return 130
        print(f"vmmkit: error: {self.stop_detail}", file=sys.stderr)
        return exitcodes.VMM_FAILURE

    def _vcpu_loop(self, vcpu) -> None:
        try:
            self._vcpu_run(vcpu)
        except VmmkitError as exc:
            self.request_stop("error", f"vcpu{vcpu.index}: {exc}")
        except Exception as exc:  # a device bug must stop the VM cleanly, not hang it
            import traceback
            self.request_stop("error", f"vcpu{vcpu.index}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    def _vcpu_run(self, vcpu) -> None:
        pio_read, pio_write = self.pio_bus.read, self.pio_bus.write
        mmio_read, mmio_write = self.mmio_bus.read, self.mmio_bus.write
        if os.environ.get("VMMKIT_EXIT_STATS"):
            from .exitstats import counting
            pio_read, pio_write, mmio_read, mmio_write = counting(vcpu.index, pio_read, pio_write, mmio_read, mmio_write)
        run_map = memoryview(vcpu.run_map)
        EXIT_IO, EXIT_MMIO, IO_OUT = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_IO_OUT
        stop = self.stop_event
        while not stop.is_set():
            ex = vcpu.run()
            if ex is None:
                continue
            reason = ex.reason
            if reason == EXIT_IO:
                size, off, port = ex.io_size, ex.io_data_offset, ex.io_port
                out = ex.io_direction == IO_OUT
                for _ in range(ex.io_count):
                    if out:
                        pio_write(port, bytes(run_map[off:off + size]))
                    else:
                        run_map[off:off + size] = pio_read(port, size)
                    off += size
            elif reason == EXIT_MMIO:
                if ex.mmio_is_write:
                    mmio_write(ex.mmio_phys_addr, vcpu.mmio_write_data())
                else:
                    vcpu.set_mmio_data(mmio_read(ex.mmio_phys_addr, ex.mmio_len))
            elif reason == lib.KVM_EXIT_SYSTEM_EVENT:
                if ex.system_event_type == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
                    self.request_stop("poweroff")
                elif ex.system_event_type == lib.KVM_SYSTEM_EVENT_RESET:
                    self.request_stop("reboot")
                else:
                    self.request_stop("error", f"guest crashed (system event {ex.system_event_type})")
            elif reason == lib.KVM_EXIT_SHUTDOWN:
                # A triple fault: real hardware resets, and so does Linux's reboot=t.
                self.request_stop("reboot", "triple fault")
            elif reason == lib.KVM_EXIT_HLT:
                continue
            elif reason == lib.KVM_EXIT_INTR:
                continue
            else:
                regs = vcpu.get_regs()
                raise KvmError(f"unexpected exit {reason} (hw reason {ex.hw_reason:#x}, suberror {ex.internal_suberror}) "
                               f"at rip {regs['rip']:#x}")

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release KVM, memory, devices and eventfds."""
        try:
            threads.remove_thread_start_callback(self._thread_started)
        except ValueError:
            pass  # closed before
        for transport in self.virtio_transports:
            transport.close()
            close = getattr(transport.device, "close", None)
            if close is not None:
                close()
        for line in self.irq_lines.values():
            line.event.close()
        if hasattr(self, "kvm_vm"):
            self.kvm_vm.close()
        if hasattr(self, "memory"):
            self.memory.close()
        if hasattr(self, "kvm"):
            self.kvm.close()
