"""`vmmkit`'s start-up: the command line is parsed without modules that only cost time."""

import os
import subprocess
import sys


def python(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout


def test_building_the_parser_does_not_import_shutil():
    # argparse's default help formatter imports shutil (zlib, bz2, lzma) on every add_argument.
    code = ("import sys; from vmmkit.cli import make_parser; make_parser().parse_args(['run', 'vm.toml']); "
            "print(sorted(m for m in ('shutil', 'bz2', 'lzma') if m in sys.modules))")
    assert python(code).strip() == "[]"


def test_help_follows_the_terminal_width_from_columns():
    narrow = python("from vmmkit.cli import main; main(['run', '--help'])", COLUMNS="50")
    wide = python("from vmmkit.cli import main; main(['run', '--help'])", COLUMNS="200")
    assert max(len(line) for line in narrow.splitlines()) <= 50
    assert max(len(line) for line in wide.splitlines()) > 50
    assert "--exec CMD" in narrow and "--exec CMD" in wide
