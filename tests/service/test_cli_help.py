"""`dex COMMAND --help` prints every command's options (a help string argparse cannot
format would crash it with a traceback instead)."""

import pytest

from dexserve.cli import commands, main


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_prints_its_help(name, capsys):
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dex {name}") and "options:" in out
