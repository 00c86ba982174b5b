"""``tether serve --agent``: what it accepts (tether agents, framework agents, files) and the
one-line errors for what it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.agents import Agent
from tether.cli import CommandError, load_agent


def test_a_tether_agent_from_a_file_path(tmp_path: Path) -> None:
    source = tmp_path / "my_agent.py"
    source.write_text("from tether.agents import Agent\nagent = Agent('mine', sessions=['x*'])\n")
    agent = load_agent(f"{source}:agent", ["ignored-*"])
    assert isinstance(agent, Agent) and agent.name == "mine" and agent.serves("x1")


def test_a_factory_is_called(tmp_path: Path) -> None:
    source = tmp_path / "factory_agent.py"
    source.write_text("from tether.agents import Agent\n"
                      "def make():\n    return Agent('made')\n")
    assert load_agent(f"{source}:make").name == "made"


@pytest.mark.parametrize(("spec", "says"), [
    ("no_colon", "must look like"),
    ("tests.agents.test_load:nothing_here", "cannot load agent"),
    ("/nowhere/agent.py:agent", "no file"),
    ("tests.agents.test_load:NOT_AN_AGENT", "not a tether Agent nor an agent of a framework"),
])
def test_what_is_refused_says_why(spec: str, says: str) -> None:
    with pytest.raises(CommandError, match=says):
        load_agent(spec)


NOT_AN_AGENT = {"a": 1}
