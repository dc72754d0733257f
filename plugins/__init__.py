"""vmmkit's built-in plugins (installed as the ``vmmkit_plugins`` package).

Each is registered through the ``vmmkit`` entry-point group, like any
third-party plugin.
"""
