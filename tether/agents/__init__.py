"""Agent runs: state machine, agents, tools, model adapters, the run manager."""
