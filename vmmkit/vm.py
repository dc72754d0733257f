"""Building and running a VM from a VmSpec: the one path for TOML files and Python programs.

A Vm owns the KVM VM, guest memory, the PIO and MMIO buses and the vCPU
threads. Devices come from plugins (platform devices through
``vmmkit_vm_setup_platform``, virtio devices through their kinds); the core
knows none of them.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

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

log = logging.getLogger("vmmkit.vm")

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


class VmStateError(VmmkitError):
    """A lifecycle request that the VM's current state does not allow (pause while stopping, ...)."""

    exit_code = 1


#: What :attr:`Vm.state` can be.
STATES = ("starting", "running", "paused", "stopping", "stopped")


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
        #: Kernel arguments that devices need (virtio-mem: online hotplugged memory), added
        #: by their plugins while the VM is built; they come before [boot] cmdline, which can override them.
        self.kernel_args: list[str] = []
        self.vcpus = []
        self._vcpu_threads = []
        self._built = False
        # Pause and resume (see pause()): one lifecycle request at a time; the
        # vCPU threads park on _park_cond while _pause_requested is set.
        self._lifecycle_lock = threading.RLock()
        self._park_cond = threading.Condition()
        self._pause_requested = False
        self._parked = 0
        self._paused = False
        self._started = False
        self._finished = False
        self._device_ids: dict[int, str] = {}  # id(transport) -> the [[device]] id it belongs to
        self.power_button = None
        #: time.time() of the last power-button press (graceful shutdown request), or None.
        self.shutdown_requested_at: float | None = None
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
        line = self.irq_line(gsi)
        transport = VirtioMmioTransport(device, self.memory, line.trigger, irq_fd=line.event.fd,
                                        kvm_vm=self.kvm_vm, base=base)
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
        """Stop the VM ("poweroff", "reboot", "error", "signal", "exec-done", "stop"); the first reason wins."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_detail = reason, detail
        self.stop_event.set()
        with self._park_cond:
            self._park_cond.notify_all()  # parked vCPUs (a paused VM) leave too
        self._kick_vcpus()

    def _kick_vcpus(self) -> None:
        """Make every vCPU leave KVM_RUN soon: immediate_exit, then a signal to its thread."""
        for vcpu in self.vcpus:
            vcpu.request_exit()
        for t in self._vcpu_threads:
            if t.ident is not None and t.is_alive() and t is not threading.current_thread():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    # ----- lifecycle control (the control API's verbs) -----
    @property
    def state(self) -> str:
        """"starting", "running", "paused", "stopping" or "stopped" (one of :data:`STATES`)."""
        if self._finished:
            return "stopped"
        if self.stop_event.is_set():
            return "stopping"
        if not self._started:
            return "starting"
        return "paused" if self._paused else "running"

    def pause(self, timeout: float = 10.0) -> None:
        """Stop every vCPU and device worker; return once they have all stopped (contract 3).

        Each vCPU leaves KVM_RUN (a kick), completes the exit it was handling
        (an MMIO or port read's data goes back to KVM first) and parks; then
        every virtio device's worker pauses. Nothing touches guest memory until
        :meth:`resume`, which continues exactly where the guest stopped. Pausing
        a paused VM does nothing. Raises :class:`VmStateError` when the VM is
        not running, and :class:`VmmkitError` (the VM left running) when a vCPU
        or a device does not stop within *timeout* seconds.
        """
        with self._lifecycle_lock:
            state = self.state
            if state == "paused":
                return
            if state != "running":
                raise VmStateError(f"the VM is {state}: only a running VM can be paused")
            with self._park_cond:
                self._pause_requested = True
            self._kick_vcpus()
            with self._park_cond:
                parked = self._park_cond.wait_for(
                    lambda: self._parked >= len(self.vcpus) or self.stop_event.is_set(), timeout)
                missing = len(self.vcpus) - self._parked
            if self.stop_event.is_set() or not parked:
                self._release_vcpus()
                if self.stop_event.is_set():
                    raise VmStateError("the VM is stopping: it cannot be paused")
                raise VmmkitError(f"pause failed: {missing} vCPU(s) did not stop within {timeout:g} s")
            paused = []
            for transport in self.virtio_transports:
                if not transport.device.pause():
                    for other in paused:
                        other.device.resume()
                    self._release_vcpus()
                    raise VmmkitError(f"pause failed: device {self._device_label(transport)} did not stop")
                paused.append(transport)
            self._paused = True
            # Inside the lock, so that a concurrent resume cannot report before this pause.
            self.plugins.call("vmmkit_vm_paused", vm=self)

    def resume(self) -> None:
        """Undo :meth:`pause`: devices first, then the vCPUs. Resuming a running VM does nothing."""
        with self._lifecycle_lock:
            state = self.state
            if state == "running":
                return
            if state != "paused":
                raise VmStateError(f"the VM is {state}: only a paused VM can be resumed")
            for transport in self.virtio_transports:
                transport.device.resume()
            self._release_vcpus()
            self._paused = False
            self.plugins.call("vmmkit_vm_resumed", vm=self)

    def _release_vcpus(self) -> None:
        with self._park_cond:
            self._pause_requested = False
            self._park_cond.notify_all()

    def _park(self, vcpu) -> None:
        """Called in a vCPU thread after KVM_RUN returned EINTR with a pause requested.

        EINTR from KVM_RUN means KVM has completed the last exit (the data of an
        MMIO or port read is in the guest's registers), so nothing is in flight.
        """
        with self._park_cond:
            self._parked += 1
            self._park_cond.notify_all()
            self._park_cond.wait_for(lambda: not self._pause_requested or self.stop_event.is_set())
            self._parked -= 1
            self._park_cond.notify_all()

    def press_power_button(self) -> None:
        """Graceful shutdown: press the ACPI power button; the guest decides what to do.

        The DSDT's Generic Event Device turns an edge on its GSI into
        ``Notify(\\_SB.PWRB, 0x80)``, which Linux's ACPI button driver reports
        as KEY_POWER; the default guest's acpid then powers off. A guest that
        ignores the button keeps running (use :meth:`stop`). Raises
        :class:`VmStateError` unless the VM is running (a paused guest could
        not react).
        """
        with self._lifecycle_lock:
            state = self.state
            if state != "running":
                raise VmStateError(f"the VM is {state}: the power button works on a running VM"
                                   + (" (resume it first, or stop it)" if state == "paused" else ""))
            self.power_button.trigger()
            self.shutdown_requested_at = time.time()

    def stop(self) -> None:
        """Stop the VM at once, as if its power were cut (reason "stop"); works in any state."""
        self.request_stop("stop", "stopped through the control API")

    def inspect(self) -> dict:
        """A paused VM's vCPUs and virtio devices as they stand, for finding out why a guest hangs.

        Per vCPU, :meth:`Vcpu.inspect` (where it is, whether it is halted,
        the interrupts pending at its LAPIC); per virtio device, its status,
        InterruptStatus and queues (:meth:`VirtioMmioTransport.inspect`).
        Raises :class:`VmStateError` unless the VM is paused: only then are
        the vCPUs out of KVM_RUN and the queues still.
        """
        with self._lifecycle_lock:
            if self.state != "paused":
                raise VmStateError(f"the VM is {self.state}: only a paused VM can be inspected (pause it first)")
            return {"vcpus": [vcpu.inspect() for vcpu in self.vcpus],
                    "devices": [dict(id=self._device_label(t), gsi=desc.gsi, **t.inspect())
                                for t, desc in zip(self.virtio_transports, self.mmio_devices)]}

    def device_info(self) -> list[dict]:
        """The VM's devices: each virtio transport with its [[device]] id and kind, MMIO window and GSI."""
        out = []
        kinds = {d.id: d.kind for d in self.spec.devices}
        for transport, desc in zip(self.virtio_transports, self.mmio_devices):
            dev_id = self._device_ids.get(id(transport))
            out.append({
                "id": dev_id if dev_id is not None else f"virtio-{transport.device.name}",
                "kind": kinds.get(dev_id) if dev_id is not None else None,
                "transport": "virtio-mmio",
                "virtio_id": transport.device.device_id,
                "mmio_base": desc.base,
                "mmio_size": desc.size,
                "gsi": desc.gsi,
            })
        listed = set(self._device_ids.values())
        for dspec in self.spec.devices:
            if dspec.id not in listed:  # a device kind that is not a virtio device
                out.append({"id": dspec.id, "kind": dspec.kind, "transport": None, "virtio_id": None,
                            "mmio_base": None, "mmio_size": None, "gsi": None})
        return out

    def _device_label(self, transport) -> str:
        return self._device_ids.get(id(transport)) or f"virtio-{transport.device.name}"

    # ----- building -----
    def build(self) -> "Vm":
        """Create the KVM VM, memory, devices and vCPUs; load the kernel. Nothing runs yet."""
        spec = self.spec
        # What the user can get wrong is checked before KVM is opened, so a
        # bad kernel path or an impossible memory size is reported as such on any host.
        self.kernel_path, self.initrd_path = self._guest_files()
        self.image = load_kernel_file(self.kernel_path)
        self.memory = GuestMemory.create(spec.machine.memory, shared=spec.machine.shared,
                                         backing=spec.machine.memory_file)
        self.kvm = Kvm()
        if spec.machine.vcpus > self.kvm.max_vcpus():
            raise VmmkitError(f"[machine] vcpus = {spec.machine.vcpus}: this host's KVM allows at most {self.kvm.max_vcpus()}")
        self.kvm_vm = self.kvm.create_vm()
        self.kvm_vm.setup_x86()
        if spec.machine.halt_poll_ns is not None:
            try:
                self.kvm_vm.set_halt_poll_ns(spec.machine.halt_poll_ns)
            except KvmError as exc:
                raise VmmkitError(f"[machine] halt_poll_ns = {spec.machine.halt_poll_ns}: {exc}") from None
        self.memory.register(self.kvm_vm)
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.plugins.call("vmmkit_vm_setup_platform", vm=self)
        # The power button: an edge on the GED's GSI (see vmmkit.boot.acpi), wired now so that
        # pressing it later is one eventfd write from any thread.
        self.power_button = self.irq_line(acpi.AcpiLayout().ged_gsi)
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
            first = len(self.virtio_transports)
            self.devices[dspec.id] = kind.create(self, dspec)
            for transport in self.virtio_transports[first:]:
                self._device_ids[id(transport)] = dspec.id

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
        parts.extend(self.kernel_args)
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
        self._started = True
        self.plugins.call("vmmkit_vm_started", vm=self)
        try:
            while not self.stop_event.wait(0.5):
                pass
        except KeyboardInterrupt:
            self.request_stop("signal", "interrupted")
        for t in self._vcpu_threads:
            t.join(timeout=5)
        with self._lifecycle_lock:  # a pause or resume in progress finishes first
            for transport in self.virtio_transports:
                transport.device.reset()  # workers stop before the memory they use goes away
        self.plugins.call("vmmkit_vm_stopping", vm=self, reason=self.stop_reason)
        self._finished = True
        return self._exit_status()

    def _exit_status(self) -> int:
        reason = self.stop_reason
        if self.exec_stream is not None:
            self.exec_stream.close()
            if self.exec_stream.status is not None:
                return self.exec_stream.status
            if reason == "stop":
                print("vmmkit: stopped through the control API before the command reported its status",
                      file=sys.stderr)
                return exitcodes.NO_STATUS
            if reason == "error":
                print(f"vmmkit: error: {self.stop_detail}", file=sys.stderr)
            tail = bytes(self.exec_stream.log[-2000:]).decode(errors="replace")
            why = f"{reason}: {self.stop_detail}" if self.stop_detail and reason != "error" else reason
            print(exitcodes.STOPPED_EARLY.format(why=why) + f"; console tail:\n{tail}", file=sys.stderr)
            return exitcodes.NO_STATUS
        if reason == "poweroff":
            return exitcodes.POWEROFF
        if reason == "reboot":
            return exitcodes.REBOOT
        if reason == "signal":
            return 130
        if reason == "stop":
            return exitcodes.POWEROFF  # stopped on request (the control API): not a failure
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
                # A kick. EINTR means KVM has completed the previous exit, so a pause can take hold here.
                if self._pause_requested:
                    self._park(vcpu)
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
            log.debug("vCPU exits answered in C (fast MMIO): %d", self.kvm_vm.fast_mmio.hits)
            self.kvm_vm.close()
        if hasattr(self, "memory"):
            self.memory.close()
        if hasattr(self, "kvm"):
            self.kvm.close()
