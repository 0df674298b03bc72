"""`batchllm-hf demo` (the README's main command) runs and checks itself against plain generate."""

from batchllm_hf.cli import main


def test_demo_runs_and_matches_plain_generate(capsys):
    assert main(["demo", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "groups 4" in out
    assert "outputs identical to plain generate: True" in out
