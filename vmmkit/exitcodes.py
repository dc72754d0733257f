"""vmmkit's exit statuses (`vmmkit run`), documented in docs/run.md."""

POWEROFF = 0        # the guest powered off (without --exec)
VMM_FAILURE = 1     # the VM failed while running (KVM internal error, guest triple fault loop, device fault)
START_ERROR = 2     # vmmkit could not start the VM: configuration, host, kernel or memory problem
REBOOT = 3          # the guest rebooted and [machine] on_reboot = "exit"
NO_STATUS = 125     # --exec: the guest stopped before the command reported its status

#: What `vmmkit run --exec` prints on stderr with NO_STATUS, ``why`` being the stop reason
#: ("reboot", "reboot: triple fault", "poweroff", ...): the test plugin looks for it.
STOPPED_EARLY = "vmmkit: the guest stopped ({why}) before the command reported its status"
