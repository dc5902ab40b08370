"""afd-bench's flags on the CPU: a bad value is a usage error naming the flag (exit 2), never a
traceback at the end of a run or a run that cannot end (`transport --iters 0`,
`scheduler --prompt-len 0` waited forever)."""

from __future__ import annotations

import pytest

from afd.bench.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["transport", "--iters", "0"], "--iters: expected a positive integer, got '0'"),
        (["transport", "--hidden", "-1"], "--hidden: expected a positive integer"),
        (["transport", "--protocols", "tcp,foo"], "--protocols: expected a comma list"),
        (["transport", "--json", "."], "--json: cannot write '.': is a directory"),
        (["transport", "--json", "no/such/x.json"], "folder 'no/such' does not exist"),
        (["scheduler", "--prompt-len", "0"], "--prompt-len: expected a positive integer"),
        (["scheduler", "--sizes", "64,abc"], "--sizes: expected a positive integer, got 'abc'"),
        (["scheduler", "--steps", "0"], "--steps: expected a positive integer"),
        (["sweep", "--dry-run", "--profile", "none.json"], "--profile: no such file"),
    ],
)
def test_bad_flags_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    assert main(["-h"]) == 0
    err = capsys.readouterr().err
    for name in ("transport", "scheduler", "serve", "kernels", "layer", "e2e", "sweep"):
        assert f"\n  {name} " in err
