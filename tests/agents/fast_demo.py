"""Demo agents with quick timings, loaded by ``tether serve --agent`` in durability tests."""

from tether.agents.demo import demo_agent

agent = demo_agent(tokens_per_second=0, ttft=0.0)
slow = demo_agent(tokens_per_second=40, ttft=0.0)
