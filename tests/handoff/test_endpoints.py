"""KV handoffs between real engines through real transports under the lease protocol.

The test is the network: it carries the endpoints' messages (and can drop, delay or withhold
them) and advances a clock. Every test ends with both engines' pools empty, no live lease,
and the transient-capacity ledger back at zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import time

import pytest

from hetpd.engine.config import EngineConfig
from hetpd.engine.disaggregated import DisaggregatedPair
from hetpd.engine.engine import Engine
from hetpd.handoff import ConsumerEndpoint, HandoffEvent, ProducerEndpoint
from hetpd.kv.plan import plan_handoff
from hetpd.outputs import RequestOutput
from hetpd.ownership import FailureKind, LeaseConfig, LeaseKey, LeaseState, Message, RecoveryPolicy, Retry, decide
from hetpd.sampling_params import SamplingParams
from hetpd.transfer import FaultInjection, TransferReceiver, TransferSender, make_receiver, make_sender

PARAMS = SamplingParams(max_tokens=6, temperature=0.0)
PROMPTS = [[5, 9, 13, 2, 7, 11, 3], list(range(3, 40)), [8, 8, 1, 60, 22]]
TTL = LeaseConfig(ttl=5.0, heartbeat_interval=1.0, retain=20.0)


@dataclass
class Deployment:
    prefill: Engine
    decode: Engine
    producer: ProducerEndpoint
    consumer: ConsumerEndpoint
    now: float = 0.0
    outputs: dict[str, RequestOutput] = field(default_factory=dict)
    events: list[tuple[str, HandoffEvent]] = field(default_factory=list)
    drop_to_consumer: Callable[[Message], bool] = lambda m: False
    drop_to_producer: Callable[[Message], bool] = lambda m: False

    def deliver(self, to_consumer: list[Message], to_producer: list[Message] | None = None) -> None:
        """Carry messages back and forth until both sides are quiet."""
        to_producer = to_producer or []
        while to_consumer or to_producer:
            answers: list[Message] = []
            for m in to_consumer:
                if not self.drop_to_consumer(m):
                    answers += self.consumer.receive(m, self.now)
            replies: list[Message] = []
            for m in to_producer:
                if not self.drop_to_producer(m):
                    replies += self.producer.receive(m, self.now)
            to_producer, to_consumer = answers, replies

    def turn(self, dt: float = 0.1) -> None:
        """One round: engine steps, offers, transport completions, timers. The clock is simulated
        (leases see ``dt`` per turn); a short real pause lets socket threads deliver meanwhile."""
        time.sleep(0.005)
        self.now += dt
        if self.prefill.has_unfinished():
            step = self.prefill.step()
            self.outputs.update({o.request_id: o for o in step.finished})
            for handed in step.handed_off:
                self.deliver(self.producer.offer(handed.request_id, self.now))
        self.deliver(self.producer.poll(self.now), self.consumer.poll(self.now))
        self.deliver(self.producer.tick(self.now), self.consumer.tick(self.now))
        self.outputs.update({o.request_id: o for o in self.consumer.finished()})
        if self.decode.has_unfinished():
            self.outputs.update({o.request_id: o for o in self.decode.step().finished})
        self.events += [("producer", e) for e in self.producer.events()]
        self.events += [("consumer", e) for e in self.consumer.events()]

    def run(self, prompts: list[list[int]], max_turns: int = 400) -> None:
        for i, prompt in enumerate(prompts):
            self.prefill.add_request(f"r{i}", prompt, PARAMS)
        for _ in range(max_turns):
            self.turn()
            busy = self.prefill.has_unfinished() or self.decode.has_unfinished()
            if not busy and self.producer.live_leases() == 0 and self.consumer.live_leases() == 0:
                return
        raise AssertionError(f"handoffs did not settle: {self.producer.leases!r} {self.consumer.leases!r}")

    def assert_clean(self) -> None:
        """No page, lease or ledger entry outlives its handoff."""
        assert self.prefill.allocator.stats().num_in_use == 0 and not self.prefill.held_request_ids()
        assert self.decode.allocator.stats().num_in_use == 0 and not self.decode.reserved_request_ids()
        assert self.producer.live_leases() == 0 and self.consumer.live_leases() == 0
        for ledger in (self.producer.ledger, self.consumer.ledger):
            assert ledger.snapshot().total_bytes == 0

    def ended(self, side: str) -> dict[str, HandoffEvent]:
        return {e.request_id: e for s, e in self.events if s == side}


@pytest.fixture(params=["inproc", "shm", "tcp"])
def transport(request: pytest.FixtureRequest) -> Iterator[Callable[[FaultInjection | None], tuple[TransferSender, TransferReceiver]]]:
    made: list[TransferSender | TransferReceiver] = []

    def make(fault: FaultInjection | None = None) -> tuple[TransferSender, TransferReceiver]:
        receiver = make_receiver(request.param)
        options: dict[str, object] = {"fault": fault}
        if request.param == "inproc":
            options["receiver"] = receiver
        sender = make_sender(request.param, **options)
        made.extend([sender, receiver])
        return sender, receiver

    yield make
    for endpoint in made:
        endpoint.close()


def deployment(model: Path, sender: TransferSender, receiver: TransferReceiver, **decode_options: object) -> Deployment:
    prefill = Engine.from_config(EngineConfig(model=str(model), role="prefill", kv_cache_dtype="float32", block_size=8))
    decode = Engine.from_config(EngineConfig(model=str(model), role="decode", kv_cache_dtype="int8", block_size=4,
                                             **decode_options))  # type: ignore[arg-type]
    plan = plan_handoff(prefill.kv_format, decode.kv_format)
    producer = ProducerEndpoint(prefill, sender, plan, TTL, layers_per_post=1)
    consumer = ConsumerEndpoint(decode, receiver, lambda request_id: PARAMS, TTL)
    return Deployment(prefill, decode, producer, consumer)


@pytest.mark.timeout(120)
def test_handoffs_match_the_in_process_pair_and_leave_nothing_behind(
    tiny_model_dir: Callable[[str], Path], transport: Callable[..., tuple[TransferSender, TransferReceiver]]
) -> None:
    model = tiny_model_dir("llama")
    d = deployment(model, *transport())
    d.run(PROMPTS)
    reference = DisaggregatedPair(
        Engine.from_config(EngineConfig(model=str(model), role="prefill", kv_cache_dtype="float32", block_size=8)),
        Engine.from_config(EngineConfig(model=str(model), role="decode", kv_cache_dtype="int8", block_size=4)),
    ).generate(PROMPTS, PARAMS)
    assert [d.outputs[f"r{i}"].token_ids for i in range(len(PROMPTS))] == [o.token_ids for o in reference.outputs]
    assert d.producer.plan.site == "producer"  # fp32 -> int8 is quantised before the wire
    assert {e.state for e in d.ended("producer").values()} == {LeaseState.RELEASED}
    assert {e.state for e in d.ended("consumer").values()} == {LeaseState.COMMITTED}
    assert d.producer.ledger.snapshot().peak_total_bytes > 0
    d.assert_clean()


@pytest.mark.timeout(120)
def test_corrupted_bytes_are_never_committed(tiny_model_dir: Callable[[str], Path],
                                             transport: Callable[..., tuple[TransferSender, TransferReceiver]]) -> None:
    d = deployment(tiny_model_dir("llama"), *transport(FaultInjection(str(LeaseKey("r0", 1)), 0)))
    d.run(PROMPTS[:1])
    consumer = d.ended("consumer")["r0"]
    assert consumer.state is LeaseState.FAILED and consumer.failure is FailureKind.CHECKSUM
    assert d.ended("producer")["r0"].state is LeaseState.FAILED
    assert "r0" not in d.outputs  # nothing decoded from corrupted KV
    action = decide(RecoveryPolicy("retry", max_attempts=2, peer="same"), FailureKind.CHECKSUM, 1, "decode-0", ["decode-0"])
    assert isinstance(action, Retry) and action.peer == "decode-0"
    d.assert_clean()


@pytest.mark.timeout(120)
def test_a_full_decode_pool_refuses_and_the_producer_lets_go(
    tiny_model_dir: Callable[[str], Path], transport: Callable[..., tuple[TransferSender, TransferReceiver]]
) -> None:
    d = deployment(tiny_model_dir("llama"), *transport(), num_kv_blocks=3)  # 12 slots: the long prompt cannot fit
    d.run(PROMPTS)
    refused = d.ended("producer")["r1"]
    assert refused.failure is FailureKind.REFUSED and "KV pages" in refused.detail
    refused_ids = {r for r, e in d.ended("producer").items() if e.failure is FailureKind.REFUSED}
    assert refused_ids.isdisjoint(d.outputs) and refused_ids | set(d.outputs) == {"r0", "r1", "r2"}
    assert d.outputs  # what fits still runs
    d.assert_clean()


@pytest.mark.timeout(120)
def test_a_silent_producer_does_not_strand_the_reservation(
    tiny_model_dir: Callable[[str], Path], transport: Callable[..., tuple[TransferSender, TransferReceiver]]
) -> None:
    """The prefill side goes quiet after its offer (crashed, partitioned): both leases expire
    within a TTL and every page comes back."""
    d = deployment(tiny_model_dir("llama"), *transport())
    offered: list[Message] = []

    def partition_after_offer(message: Message) -> bool:
        offered.append(message)
        return len(offered) > 1

    d.drop_to_consumer = partition_after_offer
    d.drop_to_producer = lambda m: True
    d.run(PROMPTS[:1], max_turns=200)
    assert d.ended("consumer")["r0"].state is LeaseState.EXPIRED
    assert d.ended("producer")["r0"].state is LeaseState.EXPIRED
    assert d.now < 4 * TTL.ttl
    d.assert_clean()


@pytest.mark.timeout(120)
def test_abort_mid_transfer_releases_both_sides(tiny_model_dir: Callable[[str], Path],
                                                transport: Callable[..., tuple[TransferSender, TransferReceiver]]) -> None:
    d = deployment(tiny_model_dir("llama"), *transport())
    d.prefill.add_request("r0", PROMPTS[1], PARAMS)
    step = d.prefill.step()
    assert [o.request_id for o in step.handed_off] == ["r0"]
    offer = d.producer.offer("r0", d.now)
    reserved = d.consumer.receive(offer[0], d.now)  # the consumer reserved pages and expects the bytes
    posted = []
    for m in reserved:
        posted += d.producer.receive(m, d.now)  # the producer posts its send: bytes are on their way
    assert d.producer.leases.get("r0") is not None and d.producer.leases.get("r0").state is LeaseState.SENDING
    abort = d.producer.abort("r0", d.now, "client disconnected")  # before the consumer saw the transfer complete
    d.deliver(posted + abort)
    d.turn()
    assert d.ended("producer")["r0"].state is LeaseState.ABORTED
    assert d.ended("consumer")["r0"].state in (LeaseState.ABORTED, LeaseState.FAILED)
    assert not d.decode.has_unfinished()
    d.assert_clean()


@pytest.mark.timeout(120)
def test_an_incompatible_consumer_refuses_by_field(tiny_model_dir: Callable[[str], Path],
                                                   transport: Callable[..., tuple[TransferSender, TransferReceiver]]) -> None:
    sender, receiver = transport()
    d = deployment(tiny_model_dir("llama"), sender, receiver)
    other = Engine.from_config(EngineConfig(model=str(tiny_model_dir("qwen3")), role="decode"))
    d.consumer = ConsumerEndpoint(other, receiver, lambda request_id: PARAMS, TTL)
    d.decode = other
    d.run(PROMPTS[:1])
    refused = d.ended("producer")["r0"]
    assert refused.failure is FailureKind.REFUSED and "incompatible KV" in refused.detail and "model." in refused.detail
    d.assert_clean()


@pytest.mark.timeout(120)
def test_bytes_that_land_before_the_transfer_notice_still_commit(
    tiny_model_dir: Callable[[str], Path], transport: Callable[..., tuple[TransferSender, TransferReceiver]]
) -> None:
    """Data and control take different paths: the receive can finish before TransferPosted arrives."""
    d = deployment(tiny_model_dir("llama"), *transport())
    d.prefill.add_request("r0", PROMPTS[0], PARAMS)
    assert [o.request_id for o in d.prefill.step().handed_off] == ["r0"]
    reserved = d.consumer.receive(d.producer.offer("r0", d.now)[0], d.now)
    notices = [m for r in reserved for m in d.producer.receive(r, d.now)]  # posted; TransferPosted held back
    deadline = time.monotonic() + 10
    while d.consumer.early_results() == 0:  # the bytes arrived and were verified; the lease still waits
        assert d.consumer.poll(d.now) == [] and time.monotonic() < deadline
        time.sleep(0.01)
    d.deliver(notices)
    d.run([], max_turns=200)
    assert d.ended("consumer")["r0"].state is LeaseState.COMMITTED and "r0" in d.outputs
    d.assert_clean()
