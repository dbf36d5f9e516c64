"""The routing policy shared by the Ray router and the simulator: each rule, the counters, and bounded state."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from microserve.scale.policy import LeastLoadedPolicy, PrefixAwarePolicy, ReplicaPrefixes, RoundRobinPolicy
from microserve.scale.prefix import PrefixKey, key_from_body, key_from_text, key_from_tokens


def conversation(n_blocks: int, tag: int) -> list[int]:
    """Tokens of a prompt of ``n_blocks`` 16-token blocks, unique to ``tag``."""
    return [tag * 100_000 + i for i in range(16 * n_blocks)]


def key(tokens: list[int], model: str = "m") -> PrefixKey:
    return key_from_tokens(model, tokens)


# -- prefix keys -------------------------------------------------------------------------------------------------


def test_keys_share_exactly_the_common_whole_blocks() -> None:
    a = conversation(5, 1)
    b = a[:40] + [7] * 40  # shares 2 whole blocks (32 tokens) and part of the third
    ka, kb = key(a), key(b)
    assert len(ka) == 5 and len(kb) == 5
    assert ka.blocks[:2] == kb.blocks[:2]
    assert ka.blocks[2] != kb.blocks[2]
    assert ka.blocks[4] != kb.blocks[4]


def test_partial_last_block_is_not_keyed() -> None:
    assert len(key(list(range(31)))) == 1
    assert len(key(list(range(15)))) == 0


def test_model_and_adapter_are_separate_namespaces() -> None:
    tokens = conversation(3, 2)
    assert key_from_tokens("a", tokens).blocks[0] != key_from_tokens("b", tokens).blocks[0]
    with_adapter = key_from_tokens("a", tokens, adapter="sql")
    assert with_adapter.blocks[0] != key_from_tokens("a", tokens).blocks[0]


def test_keys_are_stable_across_processes() -> None:
    # blake2b, not Python's salted hash(): a router and a simulator in other processes must agree.
    assert key_from_text("m", "x" * 64).blocks == (int.from_bytes(_blake(b"x" * 64), "little"),)


def _blake(block: bytes) -> bytes:
    import hashlib
    import json

    start = hashlib.blake2b(json.dumps(["m", None]).encode(), digest_size=8).digest()
    return hashlib.blake2b(start + block, digest_size=8).digest()


def test_key_from_chat_body_grows_with_the_history() -> None:
    history = [
        {"role": "system", "content": "You answer questions about lighthouses. " * 3},
        {"role": "user", "content": "How were lamps kept burning through the night before electricity came?"},
    ]
    first = key_from_body({"model": "m", "messages": history})
    longer = key_from_body(
        {
            "model": "m",
            "messages": [
                *history,
                {"role": "assistant", "content": "With oil. " * 10},
                {"role": "user", "content": "And?"},
            ],
        }
    )
    assert first is not None and longer is not None
    assert len(longer) > len(first) > 0
    assert longer.blocks[: len(first)] == first.blocks
    other_model = key_from_body({"model": "n", "messages": history})
    assert other_model is not None and other_model.blocks[0] != first.blocks[0]


def test_key_from_body_text_parts_and_completions() -> None:
    parts = key_from_body(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 200}]}]}
    )
    plain = key_from_body({"model": "m", "messages": [{"role": "user", "content": "y" * 200}]})
    assert parts == plain and parts is not None and len(parts) == 3
    completion = key_from_body({"model": "m", "prompt": "z" * 130})
    assert completion is not None and len(completion) == 2


@pytest.mark.parametrize(
    "body",
    [{"model": "m", "input": "embed me"}, {"messages": [{"role": "user", "content": "no model"}]}, {"model": "m"}],
)
def test_key_from_body_without_a_prompt_is_none(body: dict[str, object]) -> None:
    assert key_from_body(body) is None


# -- the prefix-aware rules ----------------------------------------------------------------------------------------


def policy(**kwargs: object) -> PrefixAwarePolicy:
    return PrefixAwarePolicy(rng=random.Random(0), **kwargs)  # type: ignore[arg-type]


def test_a_seen_prefix_goes_back_to_its_replica() -> None:
    p = policy(imbalance_threshold=4)
    turn1 = key(conversation(4, 1))
    p.routed("b", turn1)
    turn2 = key(conversation(4, 1) + conversation(3, 9))
    decision = p.choose(turn2, {"a": 0, "b": 2, "c": 1})
    assert decision.replica == "b"
    assert decision.reason == "prefix_hit"
    assert decision.matched == 4


def test_a_match_knows_whether_it_was_a_whole_prompt() -> None:
    prefixes = ReplicaPrefixes(capacity_blocks=100)
    turn1 = conversation(3, 1)
    prefixes.add("a", key(turn1))
    prefixes.add("b", key(turn1 + conversation(2, 2)))
    match = prefixes.longest(key(turn1 + conversation(2, 7)), ["a", "b"])
    assert (match.depth, match.holders, match.whole) == (3, {"a", "b"}, {"a"})


def test_the_longest_prefix_wins_over_a_shorter_one() -> None:
    p = policy()
    shared = conversation(2, 0)  # a system prompt every conversation starts with
    p.routed("a", key(shared + conversation(1, 1)))
    p.routed("b", key(shared + conversation(3, 2)))
    decision = p.choose(key(shared + conversation(3, 2) + conversation(1, 5)), {"a": 0, "b": 1})
    assert (decision.replica, decision.reason, decision.matched) == ("b", "prefix_hit", 5)


def test_among_equal_holders_the_least_loaded_is_picked() -> None:
    p = policy()
    shared = key(conversation(2, 0))
    for r in ("a", "b", "c"):
        p.routed(r, shared)
    decision = p.choose(key(conversation(2, 0) + conversation(2, 3)), {"a": 3, "b": 1, "c": 2, "d": 0})
    assert (decision.replica, decision.reason) == ("b", "prefix_hit")


def test_a_holder_too_far_behind_the_least_loaded_loses_the_request() -> None:
    p = policy(imbalance_threshold=3)
    k = key(conversation(4, 1))
    p.routed("a", k)
    # Exactly at the threshold the prefix still wins; one more request queued and it does not.
    assert p.choose(k, {"a": 3, "b": 0}).reason == "prefix_hit"
    decision = p.choose(k, {"a": 4, "b": 0, "c": 1})
    assert (decision.replica, decision.reason) == ("b", "load_fallback")


def test_a_new_prefix_goes_to_the_less_loaded_of_two_random_replicas() -> None:
    queues = {f"r{i}": i for i in range(8)}
    chosen = Counter()
    p = policy(placement="two_choices")
    for n in range(2000):
        decision = p.choose(key(conversation(2, 1000 + n)), queues)
        assert decision.reason == "new_prefix"
        chosen[decision.replica] += 1
    # Power of two choices: the busiest replica is never the lesser of two; the least busy is picked whenever it
    # is drawn (2 of 8 draws) and so about a quarter of the time; each other one less often the busier it is.
    assert chosen["r7"] == 0
    assert 0.2 < chosen["r0"] / 2000 < 0.3
    assert chosen["r0"] > chosen["r3"] > chosen["r6"] > 0


def test_two_choices_with_two_replicas_is_least_loaded() -> None:
    p = policy(placement="two_choices")
    assert p.choose(key(conversation(2, 1)), {"a": 5, "b": 1}).replica == "b"


def test_no_prefix_is_placed_by_load() -> None:
    p = policy()
    decision = p.choose(None, {"a": 5, "b": 1})
    assert (decision.replica, decision.reason) == ("b", "no_prefix")
    assert p.choose(PrefixKey(()), {"a": 0, "b": 9}).replica == "a"


def test_a_shared_prefix_is_followed_only_when_it_costs_no_extra_wait() -> None:
    # Conversations that share a system prompt: the holder of the system prompt alone (not of this conversation)
    # gets a new conversation only when it is no busier than the power-of-two pick.
    p = policy(placement="two_choices")
    system = conversation(4, 0)
    p.routed("a", key(system + conversation(2, 1)))
    first_turn = key(system + conversation(2, 2))
    assert p.choose(first_turn, {"a": 1, "b": 1}).reason == "shared_prefix"
    decision = p.choose(first_turn, {"a": 2, "b": 1})
    assert (decision.replica, decision.reason) == ("b", "new_prefix")
    tolerant = policy(placement="two_choices", shared_threshold=1)
    tolerant.routed("a", key(system + conversation(2, 1)))
    assert tolerant.choose(first_turn, {"a": 2, "b": 1}).replica == "a"


def test_a_next_turn_follows_its_history_where_a_shared_prefix_would_not() -> None:
    p = policy(imbalance_threshold=4)
    system = conversation(4, 0)
    turn1 = system + conversation(2, 1)
    p.routed("a", key(turn1))
    # The same busier replica: the conversation's own next turn stays, another conversation's first turn does not.
    queues = {"a": 3, "b": 0}
    assert p.choose(key(turn1 + conversation(3, 8)), queues).reason == "prefix_hit"
    assert p.choose(key(system + conversation(2, 9)), queues).replica == "b"


# -- placing new conversations by the slots they would take ---------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_new_conversation_goes_where_a_slot_is_free_even_behind_a_longer_queue() -> None:
    clock = Clock()
    p = policy(slots=2, clock=clock, idle_s=100)
    for n, replica in enumerate(["a", "a", "b"]):
        p.routed(replica, key(conversation(3, n)))
    # "a" holds two conversations in its two slots, "b" one: a new conversation belongs on "b", busier or not; a
    # queue says only what is in flight, not what is held between turns.
    decision = p.choose(key(conversation(3, 50)), {"a": 0, "b": 3})
    assert (decision.replica, decision.reason) == ("b", "new_prefix")


def test_when_every_slot_is_taken_the_stalest_conversation_makes_room() -> None:
    clock = Clock()
    p = policy(slots=2, clock=clock, idle_s=100)
    for t, replica, n in [(0, "a", 1), (1, "b", 2), (2, "b", 3), (3, "a", 4)]:
        clock.now = t
        p.routed(replica, key(conversation(3, n)))
    clock.now = 10
    # Each replica's second most recent conversation would be evicted: a's spoke at t=0, b's at t=1.
    assert p.conversations.stalest("a", 2) == 0 and p.conversations.stalest("b", 2) == 1
    assert p.choose(key(conversation(3, 60)), {"a": 1, "b": 0}).replica == "a"


def test_a_next_turn_moves_its_conversation_instead_of_adding_one() -> None:
    clock = Clock()
    p = policy(slots=4, clock=clock, idle_s=100)
    turn1 = conversation(3, 1)
    p.routed("a", key(turn1))
    clock.now = 5
    p.routed("a", key(turn1 + conversation(2, 7)))
    assert p.conversations.live("a") == 1
    # A turn that spilled to another replica takes its conversation along.
    clock.now = 9
    p.routed("b", key(turn1 + conversation(2, 7) + conversation(2, 8)))
    assert (p.conversations.live("a"), p.conversations.live("b")) == (0, 1)


def test_a_quiet_conversation_stops_counting_after_its_measured_gap() -> None:
    clock = Clock()
    p = policy(clock=clock)
    # Turns 4 s apart: the idle window becomes twice the gap.
    history = conversation(2, 1)
    for t in range(0, 40, 4):
        clock.now = t
        history = history + conversation(1, 100 + t)
        p.routed("a", key(history))
    assert p.conversations.window() == pytest.approx(8.0)
    p.routed("b", key(conversation(2, 2)))
    clock.now = 36 + 7.9
    assert p.conversations.live("a") == 1
    clock.now = 36 + 8.1
    assert p.conversations.live("a") == 0
    assert p.conversations.live("b") == 0  # sent at t=36 too
    assert len(p.conversations) == 0


def test_equal_slots_and_load_prefer_the_holder_of_a_shared_prompt() -> None:
    p = policy(clock=Clock(), idle_s=100)
    system = conversation(4, 0)
    p.routed("a", key(system + conversation(2, 1)))
    p.routed("b", key(conversation(3, 2)))
    # "c" holds no conversation: it wins, though a request (without a prompt) is in flight there.
    assert p.choose(key(system + conversation(2, 3)), {"a": 0, "b": 0, "c": 1}).replica == "c"
    p.routed("c", key(conversation(3, 9)))
    # Now all three tie on slots and load, and "a" holds the system prompt.
    decision = p.choose(key(system + conversation(2, 3)), {"a": 0, "b": 0, "c": 0})
    assert (decision.replica, decision.reason, decision.matched) == ("a", "shared_prefix", 4)


def test_conversations_state_is_bounded() -> None:
    p = policy(capacity_blocks=50, clock=Clock(), idle_s=1e9)
    queues = {f"r{i}": 0 for i in range(4)}
    for n in range(3000):
        k = key(conversation(2, n))
        p.routed(p.choose(k, queues).replica, k)
    assert len(p.conversations) <= 4 * 50


def test_new_conversations_fill_replicas_evenly() -> None:
    clock = Clock()
    p = policy(slots=8, clock=clock, idle_s=100)
    queues = {f"r{i}": 0 for i in range(8)}
    for n in range(64):
        clock.now = n * 0.1
        k = key(conversation(3, n))
        p.routed(p.choose(k, queues).replica, k)
    assert {p.conversations.live(r) for r in queues} == {8}


def test_placement_and_slots_are_checked() -> None:
    with pytest.raises(ValueError, match="placement"):
        policy(placement="random")
    with pytest.raises(ValueError, match="slots"):
        policy(slots=0)


def test_only_candidates_are_considered() -> None:
    p = policy()
    k = key(conversation(3, 1))
    p.routed("gone", k)
    decision = p.choose(k, {"a": 0, "b": 0})
    assert decision.reason == "new_prefix" and decision.replica in {"a", "b"}


def test_counters_count_each_decision() -> None:
    p = policy(imbalance_threshold=0)
    k = key(conversation(3, 1))
    p.choose(k, {"a": 0, "b": 0})
    p.routed("a", k)
    p.choose(k, {"a": 0, "b": 0})
    p.choose(k, {"a": 1, "b": 0})
    p.choose(None, {"a": 0})
    assert p.counts == Counter({"new_prefix": 1, "prefix_hit": 1, "load_fallback": 1, "no_prefix": 1})


def test_removing_a_replica_forgets_its_prefixes() -> None:
    p = policy()
    k = key(conversation(3, 1))
    p.routed("a", k)
    p.remove("a")
    assert p.prefixes.replicas == set()
    assert p.choose(k, {"a": 0, "b": 0}).reason == "new_prefix"


def test_no_replicas_is_an_error() -> None:
    for pol in (policy(), LeastLoadedPolicy(), RoundRobinPolicy()):
        with pytest.raises(ValueError, match="no replica"):
            pol.choose(None, {})


# -- bounded state -----------------------------------------------------------------------------------------------


def test_state_is_bounded_per_replica_and_evicts_least_recent() -> None:
    prefixes = ReplicaPrefixes(capacity_blocks=10)
    first = key(conversation(4, 1))
    prefixes.add("a", first)
    for n in range(2, 200):
        prefixes.add("a", key(conversation(4, n)))
        prefixes.add("b", key(conversation(4, n)))
        assert prefixes.held("a") <= 10 and prefixes.held("b") <= 10
    assert len(prefixes) == 20
    assert prefixes.longest(first, ["a", "b"]).depth == 0
    # The index shrinks with the LRUs: no hash is kept for a block that no replica holds any more.
    assert len(prefixes._holders) <= 20


def test_eviction_keeps_a_whole_prefix() -> None:
    prefixes = ReplicaPrefixes(capacity_blocks=6)
    long = key(conversation(5, 1))
    prefixes.add("a", long)
    prefixes.add("a", key(conversation(3, 2)))  # 8 blocks sent, 6 kept: two of the long prompt's tail go
    match = prefixes.longest(long, ["a"])
    assert (match.depth, match.holders, match.whole) == (3, {"a"}, set())


def test_resending_a_prefix_refreshes_it() -> None:
    prefixes = ReplicaPrefixes(capacity_blocks=4)
    keep = key(conversation(2, 1))
    prefixes.add("a", keep)
    prefixes.add("a", key(conversation(2, 2)))
    prefixes.add("a", keep)  # now the most recent
    prefixes.add("a", key(conversation(2, 3)))  # evicts conversation 2, not 1
    assert prefixes.longest(keep, ["a"]).depth == 2
    assert prefixes.longest(key(conversation(2, 2)), ["a"]).depth == 0


def test_policy_state_stays_bounded_under_many_conversations() -> None:
    p = policy(capacity_blocks=100)
    queues = {f"r{i}": 0 for i in range(4)}
    for n in range(5000):
        k = key(conversation(8, n))
        p.routed(p.choose(k, queues).replica, k)
    assert len(p.prefixes) <= 4 * 100


# -- the baselines -----------------------------------------------------------------------------------------------


def test_round_robin_cycles_and_least_loaded_follows_queues() -> None:
    rr = RoundRobinPolicy()
    assert [rr.choose(None, {"a": 9, "b": 0, "c": 0}).replica for _ in range(4)] == ["a", "b", "c", "a"]
    ll = LeastLoadedPolicy(rng=random.Random(0))
    assert ll.choose(key(conversation(2, 1)), {"a": 2, "b": 1, "c": 3}).replica == "b"
    assert ll.counts["least_loaded"] == 1


def test_new_prefixes_at_equal_load_go_where_less_is_cached() -> None:
    # One request at a time (queues always equal): new conversations still alternate over the replicas.
    p = policy()
    homes = []
    for n in range(6):
        k = key(conversation(3, 500 + n))
        decision = p.choose(k, {"a": 0, "b": 0})
        p.routed(decision.replica, k)
        homes.append(decision.replica)
    assert sorted(homes) == ["a", "a", "a", "b", "b", "b"]
