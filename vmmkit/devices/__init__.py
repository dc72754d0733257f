"""Device models that the VMM puts on its buses (legacy PC devices and friends)."""
