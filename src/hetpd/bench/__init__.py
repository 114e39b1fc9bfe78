"""`hetpd bench`: a load generator for any OpenAI-compatible server (workload side: traces, arrivals, prompts)."""
