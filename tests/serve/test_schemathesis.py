"""Property-based fuzzing of a real ``hetpd serve`` from the OpenAPI document it serves.

Schemathesis (its Python engine: the phases and checks of ``st run``) generates requests for
every operation from ``/openapi.json``: schema-valid ones (positive), which should reach the
engine and be answered, and schema-violating ones (negative), which should be refused with a
4xx. Over real HTTP, against real worker processes, with an API key set (so the checks also
send requests without it and expect 401). Asserted: no 5xx, no response slower than the
per-request timeout (no hang), no failed check (status codes and content types as documented,
responses matching their schemas, invalid data refused, missing auth refused), most
positive generations answered 200, and afterwards the deployment still answers and holds no
KV page or lease.

The positive run's schema caps ``max_tokens`` at 8 (and requires it for chat, whose default is
the whole context) so that generation stays short; the negative run uses the served schema as
is, so its boundaries are the server's.
"""

from __future__ import annotations

import copy
import json
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.config import CacheConfig, SchemathesisConfig
from schemathesis.engine import events, from_schema
from schemathesis.generation import GenerationMode
from serve.served import Served, serve

API_KEY = "fuzz-key"
REQUEST_TIMEOUT_S = 10.0  # any response slower than this is a hang (tiny-model requests take ~20 ms)
MAX_EXAMPLES = 50  # per operation and mode: ~650 requests in all
GENERATED_MAX_TOKENS = 8


def deployment(model: Path) -> dict[str, Any]:
    return {"model": str(model), "served_model_name": "tiny",
            "router": {"host": "127.0.0.1", "secret": "fuzz-secret", "api_key": API_KEY},
            "handoff": {"lease_ttl_s": 3.0, "heartbeat_s": 0.5},
            "pools": [{"name": "prefill", "role": "prefill", "num_kv_blocks": 64},
                      {"name": "decode", "role": "decode", "num_kv_blocks": 64, "dtype": "bfloat16",
                       "kv_cache_dtype": "int8"}]}


@pytest.fixture(scope="module")
def served(tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve(deployment(tiny_model_dir("llama")), tmp_path_factory.mktemp("fuzz")) as s:
        yield s


def fetch(served: Served, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(served.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


@dataclass
class Outcome:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    slowest: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def responses(self) -> int:
        return sum(self.statuses.values())

    def count(self, operation: str, status: int | None = None) -> int:
        return sum(n for (op, code), n in self.statuses.items() if op == operation and status in (None, code))


def fuzz(served: Served, raw_schema: dict[str, Any], mode: GenerationMode) -> Outcome:
    config = SchemathesisConfig(cache=CacheConfig(enabled=False), seed=20240611)  # reproducible; no cache files
    schema = schemathesis.openapi.from_dict(copy.deepcopy(raw_schema), config=config)
    schema.config.update(base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"},
                         request_timeout=REQUEST_TIMEOUT_S)
    schema.config.generation.update(modes=[mode], max_examples=MAX_EXAMPLES, database="none")
    schema.config.phases.update(phases=["examples", "coverage", "fuzzing"])
    # A schema cannot say that the prompt plus max_tokens must fit the context, or that text of
    # whitespace only has no tokens: such schema-valid requests get a 400 by design. That
    # positive cases do reach the engine is asserted from the counts instead.
    schema.config.checks.update(excluded_check_names=["positive_data_acceptance"])
    outcome = Outcome()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for interaction in event.recorder.interactions.values():
                response = interaction.response
                if response is None:
                    outcome.problems.append(f"{event.recorder.label}: no response (timed out or connection lost)")
                    continue
                outcome.statuses[(event.recorder.label, response.status_code)] += 1
                outcome.slowest = max(outcome.slowest, response.elapsed)
                if response.status_code >= 500:
                    outcome.problems.append(f"{event.recorder.label}: {response.status_code} {response.text[:300]}")
            for checks in event.recorder.checks.values():
                outcome.problems += [f"{event.recorder.label}: {c.name}: {c.failure_info.failure}"[:600]
                                     for c in checks if c.failure_info is not None]
        elif isinstance(event, events.NonFatalError):
            outcome.problems.append(f"{event.label}: {event.info.message}"[:600])
        elif isinstance(event, events.FatalError):
            outcome.problems.append(f"fatal: {event.exception}"[:600])
    return outcome


def capped(raw_schema: dict[str, Any]) -> dict[str, Any]:
    """The served schema with max_tokens at most 8 (and required in chat): short generations."""
    schema = copy.deepcopy(raw_schema)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        body = schema["components"]["schemas"][name]
        for name_ in ("max_tokens", "max_completion_tokens"):
            for branch in body["properties"].get(name_, {}).get("anyOf", []):
                if branch.get("type") == "integer":
                    branch["maximum"] = GENERATED_MAX_TOKENS
    schema["components"]["schemas"]["ChatCompletionRequest"]["required"].append("max_tokens")
    return schema


def test_the_served_schema_states_what_the_api_validates(served: Served) -> None:
    _, schema = fetch(served, "/openapi.json")
    bodies = schema["components"]["schemas"]
    completion, chat = bodies["CompletionRequest"]["properties"], bodies["ChatCompletionRequest"]["properties"]
    assert completion["model"]["enum"] == chat["model"]["enum"] == ["tiny"]
    ids = next(b for b in completion["prompt"]["anyOf"] if b.get("type") == "array")["items"]
    assert (ids["minimum"], ids["maximum"]) == (0, 255)  # the tiny model's vocabulary
    seed = next(b for b in completion["seed"]["anyOf"] if b.get("type") == "integer")
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**63 - 1)  # exact, not rounded through a float
    assert next(b for b in chat["max_tokens"]["anyOf"] if b.get("type") == "integer")["maximum"] == 511
    post = schema["paths"]["/v1/completions"]["post"]
    assert {"400", "401", "404", "408", "413", "503"} <= post["responses"].keys() and "422" not in post["responses"]
    assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert post["security"] and schema["paths"]["/metrics"]["get"]["security"]
    assert "security" not in schema["paths"]["/health"]["get"]
    assert "HTTPValidationError" not in bodies


@pytest.mark.timeout(240)
def test_generated_requests_get_no_5xx_and_no_hang_and_leave_nothing_behind(served: Served) -> None:
    _, raw_schema = fetch(served, "/openapi.json")
    positive = fuzz(served, capped(raw_schema), GenerationMode.POSITIVE)
    negative = fuzz(served, raw_schema, GenerationMode.NEGATIVE)
    summary = (f"positive {positive.responses} responses {dict(positive.statuses)}; "
               f"negative {negative.responses} responses {dict(negative.statuses)}; "
               f"slowest {max(positive.slowest, negative.slowest):.2f}s")
    print(summary)
    assert not positive.problems + negative.problems, "\n".join(positive.problems + negative.problems)
    assert positive.responses + negative.responses >= 400, summary
    assert max(positive.slowest, negative.slowest) < REQUEST_TIMEOUT_S, summary
    # Generated completions reach the engine: most schema-valid ones are answered.
    for operation in ("POST /v1/completions", "POST /v1/chat/completions"):
        answered, auth_probes = positive.count(operation, 200), positive.count(operation, 401)
        assert answered >= 0.8 * (positive.count(operation) - auth_probes), summary
        assert positive.count(operation, 401) >= 1 and negative.count(operation, 400) >= 50, summary
    # Afterwards the deployment answers a normal request and holds no KV page, lease or reservation.
    status, reply = fetch(served, "/v1/completions", {"model": "tiny", "prompt": "w5 w6 w7", "max_tokens": 4,
                                                      "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] == 4
    served.wait_idle()
