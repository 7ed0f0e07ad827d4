"""The command line's error paths."""

from sparsex_jax.entrypoints import cli


def test_cli_reports_bad_model_cleanly(capsys):
  assert cli.main(["demo", "--model", "no-such-model"]) == 2
  assert "unknown model" in capsys.readouterr().err.lower()
